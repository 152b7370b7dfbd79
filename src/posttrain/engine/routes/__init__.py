"""The HTTP routes of the Tinker wire protocol (`/api/v1/...`), one module per area; `server.create_app`
assembles them."""
