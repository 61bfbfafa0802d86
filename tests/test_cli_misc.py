"""Configuration, bad environments, `db init`, `workers list`, and real `bec` subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from bec.config import Settings, load_env
from bec.devstack.moto import free_port
from clihelp import fails, ok

BEC = str(Path(sys.executable).with_name("bec"))


def test_exported_variable_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("BEC_SQL_HOST=from-file\nBEC_SQL_USER=file-user\n")
    env_file.chmod(0o600)
    merged = load_env(env_file, environ={"BEC_SQL_HOST": "from-shell"})
    assert merged["BEC_SQL_HOST"] == "from-shell"
    assert merged["BEC_SQL_USER"] == "file-user"
    params = Settings(merged).db_params()
    assert params.database == "pipeline_v1" and params.port == 5432


def test_missing_variable_is_named(stack, monkeypatch):
    monkeypatch.delenv("BEC_SQL_HOST")
    assert "missing required setting BEC_SQL_HOST" in fails("jobs", "list")
    monkeypatch.setenv("BEC_SQL_HOST", "127.0.0.1")
    monkeypatch.delenv("BEC_REGION")
    assert "missing required setting BEC_REGION" in fails("jobs", "create", "--name", "ldv1")
    assert stack.db.row("SELECT count(*) AS n FROM jobs")["n"] == 0


def test_dotenv_in_working_directory_is_read(stack, monkeypatch):
    monkeypatch.delenv("BEC_SQL_DATABASE")
    Path(".env").write_text(f"BEC_SQL_DATABASE={stack.db_params.database}\n")
    Path(".env").chmod(0o600)
    ok("jobs", "create", "--name", "ldv1")
    assert stack.db.row("SELECT name FROM jobs")["name"] == "ldv1"


def test_world_readable_dotenv_warns(stack):
    Path(".env").write_text(f"BEC_SQL_DATABASE={stack.db_params.database}\n")
    Path(".env").chmod(0o644)
    result = subprocess.run([BEC, "jobs", "list"], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0
    assert ".env is readable by every user" in result.stderr


def test_group_readable_dotenv_warns(stack):
    """It holds the database password: a shared group (staff, users) reading it is a leak too."""
    Path(".env").write_text(f"BEC_SQL_DATABASE={stack.db_params.database}\n")
    Path(".env").chmod(0o640)
    result = subprocess.run([BEC, "jobs", "list"], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0
    assert ".env is readable by its group; it may hold secrets (chmod 600 .env)" in result.stderr
    Path(".env").chmod(0o600)
    result = subprocess.run([BEC, "jobs", "list"], capture_output=True, text=True, env=dict(os.environ))
    assert "Warning" not in result.stderr


def test_unreachable_database_names_host_not_password(stack, monkeypatch):
    monkeypatch.setenv("BEC_SQL_PORT", str(free_port()))
    monkeypatch.setenv("BEC_SQL_PASSWORD", "s3cret-pw")
    err = fails("jobs", "create", "--name", "ldv1")
    assert "cannot connect to PostgreSQL at postgres@127.0.0.1:" in err
    assert "s3cret-pw" not in err
    # A real process, where nothing configures logging: the pool's own "error connecting"
    # warnings (one per attempt, through Python's last-resort handler) used to come first.
    result = subprocess.run([BEC, "jobs", "list"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **stack.env, "BEC_SQL_PORT": os.environ["BEC_SQL_PORT"]})
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot connect to PostgreSQL"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert stack.sqs.list_queues().get("QueueUrls", []) == []


def test_wrong_password_is_not_echoed(stack, monkeypatch):
    monkeypatch.setenv("BEC_SQL_DATABASE", "no_such_database_here")
    monkeypatch.setenv("BEC_SQL_PASSWORD", "s3cret-pw")
    err = fails("jobs", "list")
    assert "no_such_database_here" in err and "s3cret-pw" not in err


def test_unreachable_endpoint_creates_nothing(stack, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    err = fails("jobs", "create", "--name", "ldv1")
    assert f"cannot reach {dead}" in err
    assert stack.db.row("SELECT count(*) AS n FROM jobs")["n"] == 0


def test_db_init_is_idempotent_and_psql_compatible(stack, pg_server):
    assert "✓ Schema applied" in ok("db", "init")
    assert "✓ Schema applied" in ok("db", "init")
    schema = Path(__file__).resolve().parents[1] / "schema.sql"
    with psycopg.connect(pg_server.conninfo(stack.db_params.database), autocommit=True) as conn:
        conn.execute(schema.read_text())  # what `psql -f schema.sql` does, a second time
        kinds = conn.execute("SELECT enum_range(NULL::task_status)::text").fetchone()[0]
    assert kinds == "{running,done,retryable_failed,terminal_failed}"
    index = stack.db.row("SELECT indexdef FROM pg_indexes WHERE indexname = 'task_executions_job_volume_version'")
    assert "UNIQUE" in index["indexdef"] and "(job_id, volume_id, s3_etag)" in index["indexdef"]


def test_schema_is_applied_on_first_use(stack):
    stack.db.execute("DROP TABLE task_executions, volumes, workers, jobs CASCADE")
    stack.db.execute("DROP TYPE task_status")
    ok("jobs", "create", "--name", "ldv1")
    assert stack.db.row("SELECT count(*) AS n FROM jobs")["n"] == 1


def test_workers_list_ages_and_states(stack):
    stack.db.execute(
        "INSERT INTO workers (worker_name, hostname, last_heartbeat_at, stopped_at) VALUES "
        "('w-live', 'host-a', now() - interval '3 seconds', NULL), "
        "('w-stale', 'host-b', now() - interval '10 minutes', NULL), "
        "('w-done', 'host-c', now() - interval '2 hours', now() - interval '2 hours')")
    out = ok("workers", "list")
    rows = {line.split("│")[2].strip(): [c.strip() for c in line.split("│")[1:-1]]
            for line in out.splitlines() if line.startswith("│")}
    assert rows["w-live"][2] == "host-a" and rows["w-live"][5].endswith("s ago") and rows["w-live"][7] == "active"
    assert rows["w-stale"][5] == "10m ago" and rows["w-stale"][7] == "stale"
    assert rows["w-done"][7] == "stopped" and rows["w-done"][6] != "-"


def test_workers_list_honours_stale_after(stack, monkeypatch):
    """A worker started with --stale-after 600 (say) is not stale at 90 s; the list used a
    hard-coded 60 s whatever the fleet's setting."""
    stack.db.execute("INSERT INTO workers (worker_name, hostname, last_heartbeat_at) "
                     "VALUES ('w-slow', 'host-a', now() - interval '90 seconds')")

    def state() -> str:
        line = next(line for line in ok("workers", "list", *args).splitlines() if "w-slow" in line)
        return line.split("│")[8].strip()

    args: tuple[str, ...] = ()
    assert state() == "stale"                       # the worker's default: 60 s
    args = ("--stale-after", "600")
    assert state() == "active"
    args = ()
    monkeypatch.setenv("BEC_STALE_AFTER", "600")    # as the workers are configured
    assert state() == "active"
    args = ("--stale-after", "30")
    assert state() == "stale"


def test_help_everywhere_and_version():
    assert "Usage: bec" in ok("--help")
    for group in ("jobs", "queue", "workers", "db"):
        assert "Usage:" in ok(group, "--help")
    for cmd in (["jobs", "create"], ["jobs", "stats"], ["queue", "enqueue"], ["queue", "redrive"],
                ["workers", "list"], ["db", "init"]):
        assert "Usage:" in ok(*cmd, "--help")
    assert "bec, version" in ok("--version")


def test_quick_start_through_real_subprocesses(stack, tmp_path):
    """The guide's quick start, typed as an operator types it: a real `bec` process each step."""
    env = dict(os.environ)

    def run(*args: str) -> str:
        done = subprocess.run([BEC, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = run("jobs", "create", "--name", "ldv1", "--config-text",
              '{\n  "use_gpu": true,\n  "precision": "fp16",\n  "batch_size": 16\n}')
    assert "✓ Created job: id=1, name=ldv1" in out
    (tmp_path / "volumes.txt").write_text("W22084,I0886\nW22084,I0887\nW1KG13780,I1KG15541\n")
    assert "✓ Enqueued 3 volumes to bec_ldv1_tasks" in run("queue", "enqueue", "--job-name", "ldv1",
                                                           "--file", "volumes.txt")
    assert "│ Messages Available        │ 3" in run("queue", "stats", "--job-name", "ldv1") or \
        "Messages Available" in run("queue", "stats", "--job-name", "ldv1")
    assert "Total Tasks: 0" in run("jobs", "stats", "ldv1")
    bad = subprocess.run([BEC, "jobs", "show", "missing"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and bad.stderr.strip() == "Error: unknown job 'missing' (see `bec jobs list`)"


def test_python_dash_m_bec_is_the_bec_command(stack):
    """Where only the source is on PYTHONPATH (a bare GPU machine), `python -m bec` is `bec`:
    the same commands, against the same database."""
    ok("jobs", "create", "--name", "ldv1")
    done = subprocess.run([sys.executable, "-m", "bec", "jobs", "list"], env=os.environ.copy(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ldv1" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "bec", "jobs", "show", "nope"], env=os.environ.copy(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_a_cli_command_does_not_import_the_image_or_model_stack():
    """Every `bec` command imports every command module; only `bec demo` and the worker's
    children need numpy, pyarrow, Pillow or torch, and importing them cost each command
    ~0.12 s (0.70 → 0.55 s for `bec --help`)."""
    probe = ("import sys, bec.cli; "
             "print(' '.join(m for m in ('numpy', 'pyarrow', 'PIL', 'torch', 'cv2') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == ""


def test_a_worker_without_the_ldv1_extras_says_what_to_install(stack):
    """On the core install (`pip install -e .`) every child used to crash at import, be
    restarted six times and print a traceback each time."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['cv2'] = None; "
            "from bec.cli import main; sys.argv = ['bec', 'worker', '--job-name', 'ldv1']; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **stack.env}, cwd=stack.workdir)
    assert result.returncode == 1, result.stderr
    assert "needs the ldv1 extras, and torch, opencv-python-headless are not installed" in result.stderr
    assert "pip install -e '.[ldv1]'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert stack.db.row("SELECT count(*) AS n FROM workers")["n"] == 0


def test_every_option_of_every_command_has_help_text():
    """`bec <command> --help` is the operator's manual on the host: no bare option names."""
    import click

    from bec.cli import cli

    def walk(command: click.Command, path: str):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    bare = [f"{path} {param.opts[0]}" for path, command in walk(cli, "bec") for param in command.params
            if isinstance(param, click.Option) and not param.help and param.name != "help"]
    assert bare == []
