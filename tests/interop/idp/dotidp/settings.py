"""Settings of the test OpenID provider, all from the environment that
tests/interop starts it with:

    IDP_PORT             port on 127.0.0.1 (the issuer is http://127.0.0.1:<port>/o)
    IDP_STATE_DIR        where the SQLite database lives
    IDP_ACCESS_TOKEN_TTL access and ID token lifetime in seconds (default 300)
    IDP_TEST_CONTROL     "1": serve /_test/* (key rollover, record of token requests)

The signing key is made at start-up; /_test/rotate-key replaces it at run time.
"""

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

PORT = int(os.environ.get("IDP_PORT", "9100"))
STATE_DIR = Path(os.environ.get("IDP_STATE_DIR", "/tmp/dotidp"))
TEST_CONTROL = os.environ.get("IDP_TEST_CONTROL") == "1"
TOKEN_TTL = int(os.environ.get("IDP_ACCESS_TOKEN_TTL", "300"))
ISSUER = f"http://127.0.0.1:{PORT}/o"


def new_rsa_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = os.urandom(32).hex()  # sessions only need to last as long as the process
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "dotidp.urls"
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "oauth2_provider",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "dotidp.views.Recorder",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": STATE_DIR / "idp.sqlite3"}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
LOGIN_URL = "/login/"

OAUTH2_PROVIDER = {
    "OIDC_ENABLED": True,
    "OIDC_ISS_ENDPOINT": ISSUER,
    # Rolled over by /_test/rotate-key: the new key signs, the old ones stay
    # in the key set (OIDC_RSA_PRIVATE_KEYS_INACTIVE) so tokens they signed
    # still verify.
    "OIDC_RSA_PRIVATE_KEY": new_rsa_key_pem(),
    "OIDC_RSA_PRIVATE_KEYS_INACTIVE": [],
    "OAUTH2_VALIDATOR_CLASS": "dotidp.validators.Validator",
    "SCOPES": {
        "openid": "OpenID Connect",
        "profile": "Your user name and name",
        "email": "Your e-mail address",
    },
    "DEFAULT_SCOPES": ["openid"],
    "ACCESS_TOKEN_EXPIRE_SECONDS": TOKEN_TTL,
    "ID_TOKEN_EXPIRE_SECONDS": TOKEN_TTL,
    # Refresh-token rotation: every refresh issues a new refresh token and
    # revokes the one presented; no grace period, so the old one is refused at
    # once. Reuse protection stays off: the test presents the consumed token
    # itself, and with it on DOT would revoke the whole family (tokenhub's
    # current token too), which is not what the test is about.
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
    "REFRESH_TOKEN_REUSE_PROTECTION": False,
    "PKCE_REQUIRED": True,
    # The discovery document offers only client_secret_basic, so a client that
    # picks its method from discovery sends Basic credentials, which DOT
    # form-decodes (RFC 6749 §2.3.1, unquote_plus).
    "OIDC_TOKEN_ENDPOINT_AUTH_METHODS_SUPPORTED": ["client_secret_basic"],
    # RFC 9700 behaviour, as DOT 4.0 will have it by default: `iss` in the
    # authorization response (RFC 9207), S256 only, tokens hashed at rest,
    # access tokens only in the Authorization header.
    "COMPLIANT_BCP_RFC9700_IMPLICIT_GRANT": True,
    "COMPLIANT_BCP_RFC9700_PASSWORD_GRANT": True,
    "COMPLIANT_BCP_RFC9700_PKCE_METHOD": True,
    "COMPLIANT_BCP_RFC9700_ACCESS_TOKEN_TRANSPORT": True,
    "COMPLIANT_BCP_RFC9700_AUTHZ_RESPONSE_ISS": True,
    "COMPLIANT_BCP_RFC9700_TOKEN_STORAGE": True,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"oauth2_provider": {"handlers": ["console"], "level": "DEBUG"}},
}
