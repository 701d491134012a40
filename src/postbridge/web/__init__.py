"""web room of postbridge: the server-rendered pages and JSON APIs of the connector UI and the cloud cockpit.

Shared pieces: :mod:`postbridge.web.auth` (the local administrator, sessions, CSRF, login throttling) and
:mod:`postbridge.web.pages` (templates, rendering, the error handler, login/logout, ``/healthz``, ``/static``).
Each app (``connector_app``, the cockpit) builds a FastAPI app, calls ``pages.install_common`` first, and adds thin
routes that parse input, call one function of :mod:`postbridge.services` and render JSON or HTML.

Nothing in this package may hold configuration logic of its own: validation, saving and audit entries belong to the
service layer, so the CLI, the pages and the API behave the same.
"""
