"""Framework integrations: ``areplica.contrib.fastapi`` and ``areplica.contrib.aiohttp``.

Both carry the causal token between requests in the ``X-Areplica-Token`` header and an
HttpOnly cookie, so a client that wrote then reads sees its write.
"""

TOKEN_HEADER = "X-Areplica-Token"
TOKEN_COOKIE = "areplica_token"
COOKIE_MAX_AGE = 300
