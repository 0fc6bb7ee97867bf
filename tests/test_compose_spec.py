"""docker-compose.yml against the Compose Specification schema (vendored: tests/compose-spec.json, from
github.com/compose-spec/compose-spec schema/compose-spec.json), plus the wiring Docker would only show at
`docker compose up`. The services' commands are exercised without Docker in test_prefect_server.py."""

import json
import re
from pathlib import Path

import jsonschema
import prefect
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((Path(__file__).parent / "compose-spec.json").read_text())


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_is_valid_against_the_compose_spec(spec):
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.Draft7Validator(SCHEMA).validate(spec)


def test_schema_rejects_a_broken_file(spec):
    broken = json.loads(json.dumps(spec))
    broken["services"]["worker"]["depends_on"] = {"deploy": {"condition": "when-ready"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(SCHEMA).validate(broken)


def test_services_and_their_wiring(spec):
    services = spec["services"]
    assert set(services) == {"postgres", "prefect-server", "minio", "minio-init", "deploy", "worker"}
    server = services["prefect-server"]
    assert server["image"].startswith(f"prefecthq/prefect:{prefect.__version__}-")  # same server as tested
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("minio-init", "deploy", "worker"):
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()
        env = services[name]["environment"]
        assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    for name in ("deploy", "worker"):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["STREAMTUNE_RESULT_STORAGE"].startswith("s3://")  # results persisted to MinIO
    assert services["deploy"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert services["worker"]["depends_on"]["deploy"]["condition"] == "service_completed_successfully"


def test_privacy_settings_everywhere(spec):
    for name in ("prefect-server", "deploy", "worker"):  # the services that run Prefect
        env = spec["services"][name]["environment"]
        assert env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false", name
        assert env.get("DO_NOT_TRACK") == "1", name


def test_no_secret_is_written_into_the_file(spec):
    text = (ROOT / "docker-compose.yml").read_text()
    for key in ("AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD"):
        for value in re.findall(rf"{key}: (.+)", text):
            assert value.startswith("${"), f"{key} must come from the environment: {value}"


def test_dockerfile_copies_what_the_worker_imports():
    dockerfile = (ROOT / "deployments" / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (\S+)", dockerfile, flags=re.M)
    for path in copied:
        assert (ROOT / path).exists(), path
    assert {"streamtune", "flows", "tasks", "deployments"} <= set(copied)
    assert 'CMD ["prefect", "worker", "start", "--pool", "streamtune", "--type", "process"]' in dockerfile


def test_prefect_yaml_deployments():
    config = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in config["deployments"]}
    nightly = by_name["nightly-finetune"]
    assert nightly["entrypoint"] == "flows/pipeline.py:pipeline"
    assert (ROOT / nightly["entrypoint"].split(":")[0]).is_file()
    assert nightly["schedules"][0]["cron"] == "0 3 * * *"
    assert nightly["parameters"]["params"]["incremental"] is True
    assert nightly["parameters"]["params"]["resume_from"] == "latest"
    from flows.pipeline import PipelineParams

    for deployment in config["deployments"]:  # parameters validate once the URLs are filled in
        params = dict(deployment["parameters"]["params"], source_url="s3://b/raw", work_url="s3://b/work")
        PipelineParams(**params)
