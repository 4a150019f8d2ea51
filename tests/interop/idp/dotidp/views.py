"""The provider's own pages: a login form that signs in any user name
without a password (like the project's oidc-provider test IdP), and, with
IDP_TEST_CONTROL=1, test-only endpoints on 127.0.0.1:

    POST /_test/rotate-key       key rollover: a new key signs from now on,
                                 the old one stays in the key set as inactive
    GET  /_test/record           what the token endpoint was asked and answered
                                 (grant type, client authentication, status,
                                 error, SHA-256 of the refresh token presented),
                                 and who fetched the key set (User-Agent)
"""

import base64
import hashlib
import html
import json
import threading
from urllib.parse import parse_qs

from django.conf import settings
from django.contrib.auth import get_user_model, login
from django.http import HttpResponse, HttpResponseBadRequest, HttpResponseNotAllowed, HttpResponseRedirect, JsonResponse
from django.middleware.csrf import get_token
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.csrf import csrf_exempt
from oauth2_provider.settings import oauth2_settings
from oauth2_provider.utils import jwk_from_pem

from .settings import new_rsa_key_pem

LOGIN_FORM = """<!doctype html>
<html><head><title>Sign in</title></head><body>
<h1>Sign in to the test provider</h1>
<p>Any user name signs in; there is no password.</p>
<form method="post" action="/login/">
  <input type="hidden" name="csrfmiddlewaretoken" value="{csrf}">
  <input type="hidden" name="next" value="{next}">
  <label>User name <input id="username" name="username" autofocus></label>
  <button id="submit" type="submit">Sign in</button>
</form></body></html>"""


def login_view(request):
    next_url = request.POST.get("next") or request.GET.get("next") or "/"
    if not url_has_allowed_host_and_scheme(next_url, allowed_hosts={request.get_host()}):
        next_url = "/"
    if request.method == "GET":
        return HttpResponse(LOGIN_FORM.format(csrf=get_token(request), next=html.escape(next_url)))
    if request.method != "POST":
        return HttpResponseNotAllowed(["GET", "POST"])
    username = request.POST.get("username", "").strip()
    if not username or len(username) > 150:
        return HttpResponseBadRequest("a user name is required")
    user, _ = get_user_model().objects.get_or_create(
        username=username, defaults={"email": f"{username}@example.org"}
    )
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return HttpResponseRedirect(next_url)


@csrf_exempt
def rotate_key(request):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    conf = settings.OAUTH2_PROVIDER
    conf["OIDC_RSA_PRIVATE_KEYS_INACTIVE"] = [conf["OIDC_RSA_PRIVATE_KEY"], *conf["OIDC_RSA_PRIVATE_KEYS_INACTIVE"]]
    conf["OIDC_RSA_PRIVATE_KEY"] = new_rsa_key_pem()
    oauth2_settings.reload()  # DOT caches its settings; read them again
    return JsonResponse(
        {
            "kid": jwk_from_pem(conf["OIDC_RSA_PRIVATE_KEY"]).thumbprint(),
            "inactive_kids": [jwk_from_pem(p).thumbprint() for p in conf["OIDC_RSA_PRIVATE_KEYS_INACTIVE"]],
        }
    )


_record_lock = threading.Lock()
_token_requests: list[dict] = []
_jwks_fetches: list[dict] = []


def record(request):
    with _record_lock:
        return JsonResponse({"token_requests": list(_token_requests), "jwks_fetches": list(_jwks_fetches)})


def _client_auth(request, form: dict) -> tuple[str, bool | None]:
    """The client authentication method used, and for Basic whether the
    credentials were form-encoded before base64 (RFC 6749 §2.3.1)."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if header.startswith("Basic "):
        try:
            decoded = base64.b64decode(header[6:]).decode()
        except ValueError:
            return "client_secret_basic", None
        return "client_secret_basic", "%" in decoded
    if "client_secret" in form:
        return "client_secret_post", None
    return "none", None


class Recorder:
    """Records each token request (never a token value: refresh tokens only
    as SHA-256, so the test can tell whether one was presented twice) and
    each fetch of the key set."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not settings.TEST_CONTROL:
            return self.get_response(request)
        if request.method == "GET" and request.path == "/o/.well-known/jwks.json":
            with _record_lock:
                _jwks_fetches.append({"user_agent": request.META.get("HTTP_USER_AGENT")})
            return self.get_response(request)
        if not (request.method == "POST" and request.path == "/o/token/"):
            return self.get_response(request)
        # Reading the body first keeps it readable for DOT afterwards.
        form = {k: v[0] for k, v in parse_qs(request.body.decode("utf-8", "replace")).items()}
        auth, form_encoded = _client_auth(request, form)
        response = self.get_response(request)
        error = None
        if response.status_code != 200:
            try:
                error = json.loads(response.content).get("error")
            except ValueError:
                error = "not JSON"
        entry = {
            "grant_type": form.get("grant_type"),
            "client_auth": auth,
            "basic_form_encoded": form_encoded,
            "status": response.status_code,
            "error": error,
            "refresh_token_sha256": hashlib.sha256(form["refresh_token"].encode()).hexdigest()
            if "refresh_token" in form
            else None,
        }
        with _record_lock:
            _token_requests.append(entry)
        return response
