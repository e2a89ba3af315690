"""The Exists baseline: `python -m bench.bare PORT PATHS`, a bare aiohttp server.

It answers HEAD /v2/<name>/blobs/<digest> from a dict held in memory, with the same headers as
the query service and nothing else: no validation, no index, no metrics. The query service runs
on the same framework, so the ratio between the two is what Layerlog adds per request.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web


def app(paths: list[str]) -> web.Application:
    known = {path: 1 << 20 for path in paths}

    async def head(request: web.Request) -> web.Response:
        size = known.get(request.path)
        if size is None:
            return web.Response(status=404)
        digest = request.match_info["digest"]
        return web.Response(
            status=200,
            headers={
                "Docker-Content-Digest": digest,
                "ETag": f'"{digest}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
            },
        )

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    application = web.Application()
    application.router.add_route("HEAD", "/v2/{name:.+}/blobs/{digest}", head)
    application.router.add_get("/healthz", health)
    return application


def main(argv: list[str]) -> int:
    port, paths = int(argv[0]), Path(argv[1]).read_text().split()
    web.run_app(app(paths), host="127.0.0.1", port=port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
