"""The registry's write routes: blob uploads, mounts and unlinks; manifest puts and deletes."""

from __future__ import annotations

from aiohttp import web

from services.core.settings import Settings
from services.core.waits import WaitLimit
from services.query.barrier import ReadBarrier
from services.query.index import Index
from services.registry.commandlog import CommandLog, Watcher
from services.registry.manifests import Manifests
from services.registry.uploads import Uploads


class WriteApi:
    def __init__(
        self,
        settings: Settings,
        index: Index,
        log: CommandLog,
        watch: Watcher,
        barrier: ReadBarrier,
        waits: WaitLimit,
    ) -> None:
        self.uploads = Uploads(settings, index, log, watch, barrier, waits)
        self.manifests = Manifests(index, log, watch, barrier, waits)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        # Upload routes first: /blobs/uploads/... must not be taken for a blob digest.
        self.uploads.add_routes(router)
        self.manifests.add_routes(router)
