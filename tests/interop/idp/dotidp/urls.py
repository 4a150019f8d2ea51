from django.conf import settings
from django.urls import include, path

from . import views

urlpatterns = [
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("login/", views.login_view, name="login"),
]
if settings.TEST_CONTROL:
    urlpatterns += [
        path("_test/rotate-key", views.rotate_key),
        path("_test/record", views.record),
    ]
