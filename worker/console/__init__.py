"""``leadstage console``: an operations console (pages and a JSON API) over what the workers write.

``app`` builds and serves the aiohttp application, ``api`` is the JSON API under ``/api/v1/``
(``openapi`` documents it), ``auth`` the tokens, login cookie and CSRF tokens. Pages are Jinja2
templates with one stylesheet and one script, all shipped in the package: no build step, no CDN.
"""
