from tests.airflow.conftest import airflow_home  # noqa: F401 - shared session fixture
