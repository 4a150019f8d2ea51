"""Starts the test OpenID provider on 127.0.0.1: creates its database,
registers tokenhub as a client, and serves with Django's threaded server.

Environment (besides dotidp/settings.py's):
    IDP_CLIENT_ID, IDP_CLIENT_SECRET  tokenhub's client at this provider
    IDP_REDIRECT_URIS                 space-separated redirect URIs

    python serve.py
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dotidp.settings")

import django  # noqa: E402


def main() -> None:
    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from oauth2_provider.models import get_application_model

    settings.STATE_DIR.mkdir(parents=True, exist_ok=True)
    call_command("migrate", verbosity=0, interactive=False)
    Application = get_application_model()
    client_id = os.environ["IDP_CLIENT_ID"]
    app = Application.objects.filter(client_id=client_id).first() or Application(client_id=client_id)
    app.name = "tokenhub"
    app.client_type = Application.CLIENT_CONFIDENTIAL
    app.authorization_grant_type = Application.GRANT_AUTHORIZATION_CODE
    app.redirect_uris = os.environ["IDP_REDIRECT_URIS"]
    app.algorithm = Application.RS256_ALGORITHM
    app.skip_authorization = True  # no consent page: like an IdP the operator trusts tokenhub at
    app.client_secret = os.environ["IDP_CLIENT_SECRET"]  # DOT hashes it on save
    app.save()
    call_command("runserver", f"127.0.0.1:{settings.PORT}", use_reloader=False, use_threading=True)


if __name__ == "__main__":
    main()
