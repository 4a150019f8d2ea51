"""A minimal OpenID provider built on django-oauth-toolkit, for tokenhub's
interoperability test (tests/interop). Not for anything but tests."""
