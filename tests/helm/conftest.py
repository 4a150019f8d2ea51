import helm_python as helm
import pytest

from chart_support import CHART_DIR


@pytest.fixture(scope="session")
def chart():
    """The chart, loaded once by Helm's Go SDK."""
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded
