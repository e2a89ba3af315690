"""Who may do what: logins, tokens, the repository policy, and the authority a command carries.

- passwords: the htpasswd file (bcrypt) that the token endpoint checks HTTP Basic against;
- policy: which users and groups may pull, push or delete in which repositories;
- scopes: Distribution's `repository:NAME:ACTIONS` scopes and a token's grant;
- keys: the signing keys (by kid) and the keys trusted to verify tokens;
- tokens: issuing and verifying the short-lived JWTs;
- authority: the action each command needs, and the check the upload worker makes;
- http: the registry's and query service's middleware, the Bearer challenge and /token.
"""
