"""The production stack (docker/), checked without a Docker engine.

The compose file is validated against the Compose specification's JSON schema (vendored by
check-jsonschema, so nothing is downloaded), then held to the configuration contract that the
integration test runs Airflow with (``tests/integration/stack_config.py``): the same executor, URLs
of the same schemes, the same settings keys, secrets only from ``.env``. The Dockerfiles, the init
script and the cluster policy are checked against what the compose file expects of them, and the
repository is scanned for hard-coded secrets.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from jsonschema.validators import validator_for

from tests.integration import stack_config as contract

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PLACEHOLDER = "change-me"
AIRFLOW_SERVICES = tuple(name for name in contract.COMPOSE_SERVICES if name.startswith("airflow-"))
LONG_RUNNING_AIRFLOW = tuple(name for name in AIRFLOW_SERVICES if name != "airflow-init")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|TOKEN")

# --- Compose interpolation (the subset `docker compose config` applies) ---------------------------------

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


class MissingVariableError(ValueError):
    """A ``${VAR:?message}`` / ``${VAR?message}`` whose variable is not set."""


def interpolate(value: str, env: dict[str, str]) -> str:
    """Resolve ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``, ``${VAR:?e}``, ``${VAR?e}``, ``${VAR:+a}``, ``$$``."""

    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        present, val = name in env, env.get(name, "")
        if op == ":-":
            return val or arg
        if op == "-":
            return val if present else arg
        if op in (":?", "?") and (not present or (op == ":?" and not val)):
            raise MissingVariableError(f"{name}: {arg}")
        if op == ":+":
            return arg if val else ""
        if op == "+":
            return arg if present else ""
        return val

    return "$".join(_VAR.sub(substitute, part) for part in value.split("$$"))


def interpolate_tree(node, env: dict[str, str]):  # noqa: ANN001, ANN201
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(value, env) for value in node]
    return node


def scalars(node) -> list[str]:  # noqa: ANN001
    """Every string in a parsed YAML tree (Compose interpolates values, never comments)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (*scalars(key), *scalars(value))]
    if isinstance(node, list):
        return [s for value in node for s in scalars(value)]
    return []


def references(node) -> list[re.Match]:  # noqa: ANN001
    """The ``${...}`` references Compose resolves (``$${...}`` is left to the container's shell)."""
    return [m for text in scalars(node) for part in text.split("$$") for m in _VAR.finditer(part)]


# --- the files -------------------------------------------------------------------------------------------


def parse_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        assert key not in values, f"{path.name}: {key} set twice"
        values[key.strip()] = value.strip()
    return values


@cache
def raw_compose() -> dict:
    # PyYAML resolves the anchors and the `<<` merges of x-airflow-common.
    return yaml.safe_load(COMPOSE_FILE.read_text())


@cache
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


@cache
def compose() -> dict:
    """The compose file as `docker compose --env-file .env.example config` would resolve it."""
    return interpolate_tree(raw_compose(), env_example())


def service(name: str) -> dict:
    return compose()["services"][name]


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command(svc: dict) -> list[str]:
    cmd = svc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def option(cmd: list[str], flag: str) -> str | None:
    """The value of ``--flag value`` or ``--flag=value`` in a command, None when absent."""
    for i, part in enumerate(cmd):
        if part == flag and i + 1 < len(cmd):
            return cmd[i + 1]
        if part.startswith(flag + "="):
            return part.split("=", 1)[1]
    return None


def mounts(svc: dict) -> dict[str, str]:
    """Mount target -> source (named volume or host path) of a service."""
    found = {}
    for vol in svc.get("volumes") or []:
        if isinstance(vol, str):
            source, target = vol.split(":")[:2]
        else:
            source, target = vol.get("source", ""), vol["target"]
        found[target] = source
    return found


def healthcheck_text(svc: dict) -> str:
    test = (svc.get("healthcheck") or {}).get("test") or []
    return test if isinstance(test, str) else " ".join(test)


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            instr, _, args = full.partition(" ")
            logical.append((instr.upper(), args.strip()))
    return logical


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(args.partition("=")[::2] for instr, args in dockerfile(path) if instr == "ARG")


def dockerfile_env(path: Path) -> dict[str, str]:
    env = {}
    for instr, args in dockerfile(path):
        if instr == "ENV":
            env.update(item.partition("=")[::2] for item in shlex.split(args))
    return env


def readme_production() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Production")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


# --- schema ----------------------------------------------------------------------------------------------


def compose_schema_errors(document: dict) -> list[str]:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = validator_for(schema)(schema)
    return [
        f"{'/'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}"
        for err in validator.iter_errors(document)
    ]


def test_compose_file_validates_against_the_compose_spec():
    assert compose_schema_errors(raw_compose()) == []


def test_the_compose_schema_rejects_a_broken_file():
    broken = copy.deepcopy(raw_compose())
    broken["services"]["airflow-scheduler"]["healthchek"] = broken["services"]["airflow-scheduler"].pop(
        "healthcheck"
    )
    broken["services"]["airflow-worker"]["depends_on"]["airflow-init"]["condition"] = "service_done"
    errors = compose_schema_errors(broken)
    assert any("airflow-scheduler" in e and "healthchek" in e for e in errors), errors
    assert any("airflow-worker" in e for e in errors), errors


# --- services and the contract ---------------------------------------------------------------------------


def test_every_contract_service_is_defined_and_documented():
    services = set(compose()["services"])
    readme = readme_production()
    assert set(contract.COMPOSE_SERVICES) == services
    # The section's service table: one row per service, its name in the first column.
    table = set(re.findall(r"^\| `([a-z][a-z0-9-]*)` \|", readme, re.M))
    assert table == services, f"README table vs compose: {sorted(table ^ services)}"
    known = services | set(compose()["volumes"])
    unknown = set(re.findall(r"`(airflow-[a-z-]+)`", readme)) - known
    assert not unknown, f"README names airflow-* services the compose file lacks: {unknown}"


def test_airflow_services_are_exactly_the_ones_built_from_the_airflow_image():
    built = {
        name
        for name, svc in compose()["services"].items()
        if (svc.get("build") or {}).get("dockerfile") == "docker/Dockerfile"
    }
    assert built == set(AIRFLOW_SERVICES)


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_airflow_service_environment_matches_the_contract(name):
    raw_env = environment(raw_compose()["services"][name])
    env = environment(service(name))
    expected = {**contract.AIRFLOW_ENV, **contract.COUPONOPS_ENV}
    missing = sorted(set(expected) - set(env))
    assert not missing, f"{name} lacks {missing}"
    wrong = {key: env[key] for key, want in expected.items() if not contract.matches(want, env[key])}
    assert not wrong, f"{name}: values that break the contract: {wrong}"
    for key in (k for k in expected if SECRET_NAME.search(k)):
        ref = _VAR.fullmatch(raw_env[key])
        assert ref and ref["op"] in (None, ":?", "?"), f"{name}: {key} must be ${{VAR:?...}} from .env"
        assert env_example().get(ref["name"]) == PLACEHOLDER, (
            f".env.example lacks {ref['name']}={PLACEHOLDER}"
        )


def test_every_airflow_process_shares_the_same_secrets_and_urls():
    shared = [*contract.AIRFLOW_ENV, *contract.COUPONOPS_ENV, "AIRFLOW__API__SECRET_KEY"]
    first = environment(raw_compose()["services"][AIRFLOW_SERVICES[0]])
    for name in AIRFLOW_SERVICES[1:]:
        env = environment(raw_compose()["services"][name])
        assert {k: env.get(k) for k in shared} == {k: first.get(k) for k in shared}, name


def test_urls_point_at_services_ports_and_databases_of_the_stack():
    services = compose()["services"]
    databases = {environment(service("postgres"))["POSTGRES_DB"]} | set(
        re.findall(r"CREATE DATABASE (\w+)", (DOCKER / "initdb" / "10-databases.sql").read_text())
    )
    ports = {
        "postgres": 5432,
        "redis": 6379,
        "mlflow": int(option(command(service("mlflow")), "--port")),
        "airflow-apiserver": int(option(command(service("airflow-apiserver")), "--port")),
    }
    env = environment(service("airflow-scheduler"))
    for key, value in env.items():
        if "://" not in value:
            continue
        url = urlsplit(value)
        assert url.hostname in services, f"{key} points at {url.hostname}, not a service"
        assert url.port == ports[url.hostname], f"{key}: {url.hostname} listens on {ports[url.hostname]}"
        if url.scheme.split("+")[-1] == "psycopg" or url.scheme.startswith("postgresql"):
            assert url.path.strip("/") in databases, f"{key}: database {url.path} is never created"


def test_every_variable_the_compose_file_reads_is_documented_in_env_example():
    used = {m["name"] for m in references(raw_compose())}
    assert used, "the compose file interpolates nothing"
    assert used <= set(env_example()), f".env.example lacks {sorted(used - set(env_example()))}"
    required = {m["name"] for m in references(raw_compose()) if m["op"] in (":?", "?")}
    assert {"POSTGRES_PASSWORD", "AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY"} <= required
    with pytest.raises(MissingVariableError):
        interpolate_tree(raw_compose(), {k: v for k, v in env_example().items() if k not in required})


def test_env_example_holds_only_placeholders():
    secrets = {key: value for key, value in env_example().items() if SECRET_NAME.search(key)}
    assert {"POSTGRES_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET"} <= set(secrets)
    assert {key: value for key, value in secrets.items() if value != PLACEHOLDER} == {}
    random_looking = {k: v for k, v in env_example().items() if re.fullmatch(r"[A-Za-z0-9_\-]{24,}=*", v)}
    assert random_looking == {}
    if shutil.which("git") and (ROOT / ".git").exists():
        assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode == 0


# --- health and start-up order ---------------------------------------------------------------------------

HEALTHCHECKS = {
    "postgres": "pg_isready",
    "redis": "redis-cli ping",
    "mlflow": "/health",
    "airflow-apiserver": "curl --fail http://localhost:8080/api/v2/version",
    "airflow-scheduler": "curl --fail http://localhost:8974/health",
    "airflow-dag-processor": "airflow jobs check --job-type DagProcessorJob --hostname",
    "airflow-triggerer": "airflow jobs check --job-type TriggererJob --hostname",
    "airflow-worker": "inspect ping",
    "airflow-worker-gpu": "inspect ping",
}


def test_every_service_but_the_one_shot_init_has_its_healthcheck():
    assert set(HEALTHCHECKS) == set(contract.COMPOSE_SERVICES) - {"airflow-init"}
    for name, probe in HEALTHCHECKS.items():
        svc = service(name)
        assert not (svc.get("healthcheck") or {}).get("disable"), name
        assert probe in healthcheck_text(svc), f"{name}: healthcheck {healthcheck_text(svc)!r}"
    init = service("airflow-init")
    assert "healthcheck" not in init and init.get("restart") == "no"
    # The scheduler only answers on :8974 when its health server is on.
    assert environment(service("airflow-scheduler"))["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "True"
    for name in ("airflow-worker", "airflow-worker-gpu", "airflow-dag-processor", "airflow-triggerer"):
        # `$${HOSTNAME}` reaches the container as ${HOSTNAME}: the container's, not the host's.
        assert "${HOSTNAME}" in healthcheck_text(service(name)), name


def test_start_up_order():
    services = compose()["services"]
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        for infra in ("postgres", "redis"):
            assert deps[infra]["condition"] == "service_healthy", (name, infra)
    for name in LONG_RUNNING_AIRFLOW:
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    # `couponops init` creates the MLflow experiment; workers need the execution API to run anything.
    assert services["airflow-init"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    for worker in ("airflow-worker", "airflow-worker-gpu"):
        assert services[worker]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
    for name, svc in services.items():
        for target, dep in (svc.get("depends_on") or {}).items():
            if dep["condition"] == "service_healthy":
                assert "healthcheck" in services[target], (
                    f"{name} waits on {target}, which has no healthcheck"
                )


# --- workers, volumes and images -------------------------------------------------------------------------


def test_gpu_worker_is_a_profile_on_the_gpu_queue_with_nvidia_devices():
    gpu, cpu = service("airflow-worker-gpu"), service("airflow-worker")
    assert gpu["profiles"] == ["gpu"] and "profiles" not in cpu
    assert command(gpu)[:3] == ["airflow", "celery", "worker"] and option(command(gpu), "--queues") == "gpu"
    assert "gpu" not in option(command(cpu), "--queues").split(",")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert environment(gpu)["COUPONOPS_TRAINER__ACCELERATOR"] == "gpu"
    # Its own image, with torch from an index other than the CPU one the default image uses.
    cpu_index = dockerfile_args(DOCKER / "Dockerfile")["TORCH_INDEX_URL"]
    assert "/whl/cpu" in cpu_index
    assert gpu["build"]["args"]["TORCH_INDEX_URL"] != cpu_index
    assert gpu["image"] != cpu["image"]


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_logs_state_and_landing_volumes_on_every_airflow_service(name):
    home = dockerfile_env(DOCKER / "Dockerfile")["AIRFLOW_HOME"]
    env = environment(service(name))
    found = mounts(service(name))
    declared = set(compose()["volumes"])
    for target in (f"{home}/logs", env["COUPONOPS_STATE_DIR"], env["COUPONOPS_LANDING_URL"]):
        assert target in found, f"{name} does not mount {target}"
        # Named volumes: one state volume shared by every worker (allocation's shard files live there).
        assert found[target] in declared, f"{name}: {target} is not on a named volume"
    assert found == mounts(service("airflow-scheduler"))


def test_image_user_owns_a_home_and_every_mount_point():
    steps = dockerfile(DOCKER / "Dockerfile")
    users = [args for instr, args in steps if instr == "USER"]
    assert users and users[-1] not in ("root", "0", "nobody"), users
    user = users[-1]
    run = " ".join(args for instr, args in steps if instr == "RUN")
    useradd = re.search(rf"useradd [^&;]*\b{user}\b", run)
    assert useradd and "--create-home" in useradd[0] and "--home-dir" in useradd[0], run
    owned = re.search(rf"install -d -o {user} [^&;]*", run)
    assert owned, "the image creates no folders owned by its user"
    home = dockerfile_env(DOCKER / "Dockerfile")["AIRFLOW_HOME"]
    env = environment(service("airflow-worker"))
    for target in (home, f"{home}/logs", env["COUPONOPS_STATE_DIR"], env["COUPONOPS_LANDING_URL"]):
        assert target in owned[0].split(), f"{target} is not created owned by {user}"


def test_dockerfile_installs_pinned_torch_before_the_project_and_the_providers():
    steps = [args for instr, args in dockerfile(DOCKER / "Dockerfile") if instr == "RUN"]
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    args = dockerfile_args(DOCKER / "Dockerfile")
    torch_step = next(i for i, s in enumerate(steps) if "pip install" in s and "torch==" in s)
    project_step = next(i for i, s in enumerate(steps) if re.search(r"pip install \.(\s|$)", s))
    assert torch_step < project_step
    assert f"torch=={args['TORCH_VERSION']}" == torch_pin
    assert "--index-url" in steps[torch_step] and "TORCH_INDEX_URL" in steps[torch_step]
    providers = dict(re.findall(r'"(apache-airflow-providers-[a-z-]+)==([\w.]+)"', steps[project_step]))
    assert "apache-airflow-providers-celery" in providers
    auth = environment(service("airflow-apiserver"))["AIRFLOW__CORE__AUTH_MANAGER"]
    if auth.startswith("airflow.providers.fab."):
        assert "apache-airflow-providers-fab" in providers
    for pin in pins:  # a provider the project pins must not be pinned differently in the image
        name, _, version = pin.partition("==")
        if name in providers:
            assert providers[name] == version, pin


def test_build_context_ships_every_file_the_dockerfile_copies():
    rules = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "the context should start from nothing"
    included = [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]
    for instr, args in dockerfile(DOCKER / "Dockerfile"):
        if instr != "COPY":
            continue
        sources = [part for part in shlex.split(args) if not part.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such file"
            assert any(src == inc or src.startswith(inc + "/") for inc in included), f"{src} is ignored"


def test_mlflow_server_uses_postgres_and_serves_artifacts_from_its_volume():
    mlflow = service("mlflow")
    cmd = command(mlflow)
    assert cmd[:2] == ["mlflow", "server"]
    backend = option(cmd, "--backend-store-uri")
    assert backend and backend.startswith(contract.MLFLOW_BACKEND_SCHEME), backend
    assert "--serve-artifacts" in cmd
    assert option(cmd, "--artifacts-destination") in mounts(mlflow)
    # Clients upload through the server: none of them may write to a path only it mounts.
    for name in AIRFLOW_SERVICES:
        assert environment(service(name))["COUPONOPS_MLFLOW_ARTIFACT_ROOT"].startswith("mlflow-artifacts:")
    # MLflow answers 403 to Host headers it does not list: the one the workers send must be there.
    tracking = urlsplit(environment(service("airflow-worker"))["COUPONOPS_MLFLOW_TRACKING_URI"])
    assert tracking.netloc in option(cmd, "--allowed-hosts").split(",")
    assert mlflow["build"]["dockerfile"] == "mlflow.Dockerfile"
    image_steps = " ".join(args for _, args in dockerfile(DOCKER / mlflow["build"]["dockerfile"]))
    assert re.search(r"pip install [^&]*psycopg", image_steps), "the MLflow image lacks psycopg"


def test_init_service_runs_the_migrations_script():
    init = service("airflow-init")
    script = DOCKER / "airflow-init.sh"
    copies = [args.split() for instr, args in dockerfile(DOCKER / "Dockerfile") if instr == "COPY"]
    installed = next(parts[-1] for parts in copies if "docker/airflow-init.sh" in parts)
    assert command(init) == [Path(installed).name] and installed.startswith("/usr/local/bin/")
    assert init["user"] == "0:0"  # to chown the volumes; the script drops to the image user
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    lines = [line.strip() for line in script.read_text().splitlines()]
    steps = [
        next(i for i, line in enumerate(lines) if line.startswith(step))
        for step in ('exec gosu airflow "$0"', "airflow db migrate", "couponops init", "airflow users create")
    ]
    assert steps == sorted(steps)
    text = script.read_text()
    assert PLACEHOLDER in text  # refuses the .env.example placeholders


# --- the cluster policy that routes training to the gpu queue --------------------------------------------


def _training_policy_manager():
    import pluggy
    from airflow import policies

    spec = importlib.util.spec_from_file_location(
        "couponops_local_settings", DOCKER / "airflow_local_settings.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    manager = pluggy.PluginManager(policies.local_settings_hookspec.project_name)
    manager.add_hookspecs(policies)
    policies.make_plugin_from_local_settings(manager, module, {"task_policy"})
    return manager


def _train_dag():
    from airflow.sdk import DAG

    from plugins.couponops_airflow import train_and_gate

    with DAG("policy_probe", schedule=None) as dag:
        train_and_gate()
    return dag


@pytest.mark.parametrize("queue", ["gpu", ""])
def test_training_tasks_follow_the_training_queue(monkeypatch, queue):
    monkeypatch.setenv("COUPONOPS_TRAINING_QUEUE", queue)
    manager, dag = _training_policy_manager(), _train_dag()
    before = {task.task_id: task.queue for task in dag.tasks}
    for task in dag.tasks:
        manager.hook.task_policy(task=task)
    after = {task.task_id: task.queue for task in dag.tasks}
    assert after["train_model"] == (queue or before["train_model"])
    assert {k: v for k, v in after.items() if k != "train_model"} == {
        k: v for k, v in before.items() if k != "train_model"
    }
    if queue:
        assert queue == option(command(service("airflow-worker-gpu")), "--queues")


# --- no hard-coded secrets -------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{[^}]*\}")
_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<user>[^\s:/@'\"`]*):(?P<password>[^\s@/'\"`]+)@"
    r"(?P<host>\[[^\]]*\]|[^\s/:@'\"`?#]+)"
)
# Literal values of these keys are secrets anywhere; a literal PASSWORD is fine in tests/ (loopback peers).
_SECRET_KEY = r"[A-Z0-9_]*(?:FERNET_KEY|JWT_SECRET|SECRET_KEY|PASSWORD)"
_CONFIG_ASSIGNMENT = re.compile(
    rf"^\s*(?:export\s+|-\s+)?(?P<key>{_SECRET_KEY})\s*[=:][ \t]*(?P<value>\S[^\n]*)$", re.M
)
_PYTHON_LITERAL = re.compile(rf"(?P<key>{_SECRET_KEY})[\"']?\s*[=:]\s*[\"'](?P<value>[^\"'\n]+)[\"']")
_FERNET_LIKE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}=(?![A-Za-z0-9_=-])")
_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
_PLACEHOLDER_VALUES = {
    "",
    PLACEHOLDER,
    "password",
    "pass",
    "secret",
    "***",
    "...",
    "none",
    "null",
    '""',
    "''",
}
# Hosts reserved for documentation (RFC 2606) never hold a real secret. In tests/, neither do loopback
# and single-label hosts (``h``, ``db``): fixtures of URL parsing and of peers started on loopback.
_EXAMPLE_HOSTS = re.compile(r"host|(?:[\w-]+\.)*(?:example(?:\.(?:com|net|org))?|test|invalid)")
_TEST_ONLY_HOSTS = re.compile(r"localhost|127(?:\.\d+){3}|\[::1\]|[a-z][a-z0-9-]*")


def _is_placeholder(value: str) -> bool:
    value = value.strip().strip("\"'")
    return (
        value.lower() in _PLACEHOLDER_VALUES
        or value.startswith(("$", "{", "%(", "<", "*"))
        or value.lower().startswith(PLACEHOLDER)
    )


def find_secrets(relpath: str, text: str) -> list[str]:
    """Hard-coded secrets in one file: credentials in URLs, literal keys and passwords, private keys."""
    findings = []
    in_tests = relpath.startswith("tests/")
    normalised = _INTERPOLATION.sub("${}", text)
    for m in _URL_CREDENTIALS.finditer(normalised):
        host = m["host"].lower()
        if (
            _is_placeholder(m["password"])
            or _EXAMPLE_HOSTS.fullmatch(host)
            or (in_tests and _TEST_ONLY_HOSTS.fullmatch(host))
        ):
            continue
        findings.append(f"{relpath}: password in URL {m['scheme']}://{m['user']}:***@{m['host']}")
    pattern = _PYTHON_LITERAL if relpath.endswith(".py") else _CONFIG_ASSIGNMENT
    for m in pattern.finditer(normalised):
        if in_tests and m["key"].endswith("PASSWORD"):
            continue
        if not _is_placeholder(m["value"]):
            findings.append(f"{relpath}: {m['key']} has a literal value")
    if _FERNET_LIKE.search(text):
        findings.append(f"{relpath}: a Fernet key")
    if _PRIVATE_KEY.search(text):
        findings.append(f"{relpath}: a private key")
    return findings


def test_the_secret_scanner_finds_what_it_should_and_spares_placeholders():
    from cryptography.fernet import Fernet

    secret = "hunter" + "2"
    pg = "postgresql" + "+psycopg://"
    assert find_secrets("docker/x.yml", f"url: {pg}app:{secret}@db.internal:5432/x\n")
    assert find_secrets("tests/unit/x.py", f'URL = "{pg}app:{secret}@db.internal:5432/x"\n')
    assert find_secrets("docker/x.yml", f"  AIRFLOW__CORE__FERNET_{'KEY'}: {secret}\n")
    assert find_secrets(".env", f"POSTGRES_{'PASSWORD'}={secret}\n")
    assert find_secrets("x.py", f'JWT_{"SECRET"} = "{secret}"\n')
    assert find_secrets("notes.md", Fernet.generate_key().decode())
    assert find_secrets("mlpkg/x.py", f'URL = "{pg}postgres:{secret}@127.0.0.1:5432/test"\n')
    assert find_secrets("mlpkg/x.py", f'SMTP_{"PASSWORD"} = "{secret}"\n')
    assert find_secrets("tests/unit/x.py", f'AIRFLOW__CORE__FERNET_{"KEY"} = "{secret}"\n')
    spared = [
        ("docker/x.yml", f"url: {pg}${{POSTGRES_USER:-u}}:${{POSTGRES_PASSWORD:?set it}}@postgres:5432/x\n"),
        ("docker/x.yml", f"  AIRFLOW__CORE__FERNET_{'KEY'}: ${{AIRFLOW_FERNET_KEY:?set it}}\n"),
        ("tests/integration/x.py", f'URL = "{pg}postgres:{secret}@127.0.0.1:5432/test"\n'),
        ("mlpkg/x.py", f'URL = f"{pg}{{user}}:{{password}}@{{host}}/db"\n'),
        ("README.md", f"`scheme://user:{'password'}@host/db`\n"),
        ("plugins/x.py", f"E.g. ``https://user:{secret}@gw.example:8443/sms/send``.\n"),
        ("tests/integration/x.py", f'SMTP_{"PASSWORD"} = "{secret}"\n'),
    ]
    assert [path for path, text in spared if find_secrets(path, text)] == []


def test_no_hard_coded_secrets_in_the_repository():
    if not (shutil.which("git") and (ROOT / ".git").exists()):
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    findings, scanned = [], 0
    for relpath in sorted(set(filter(None, listed.split("\0")))):
        path = ROOT / relpath
        if relpath == ".env.example" or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        scanned += 1
        findings += find_secrets(relpath, data.decode("utf-8", errors="replace"))
    assert scanned > 20 and "docker/docker-compose.yml" in listed
    assert findings == []
