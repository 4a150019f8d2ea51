"""The claims this provider releases. DOT's own validator releases only
`sub`; tokenhub names the user by `preferred_username`, so the ID token and
userinfo carry it (scope `profile`) and the e-mail address (scope `email`).
DOT filters each claim by the scope DOT's `oidc_claim_scope` maps it to."""

from oauth2_provider.oauth2_validators import OAuth2Validator


class Validator(OAuth2Validator):
    # One parameter (self): DOT then calls each value with the request, and
    # lists the claims in the discovery document's claims_supported.
    def get_additional_claims(self):
        return {
            "preferred_username": lambda request: request.user.username,
            "name": lambda request: request.user.get_full_name() or request.user.username,
            "email": lambda request: request.user.email,
            "email_verified": lambda request: True,
        }
