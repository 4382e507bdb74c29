"""save / restore / sessions / inspect from the command line, on real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

KVSIDE = str(Path(sys.executable).with_name("kvside"))


def run(home, *args):
    if args[0] in ("sessions", "save", "restore"):
        args = (*args, "--offline")  # the files, even if a daemon happens to run on this machine
    env = {**os.environ, "KVSIDE_HOME": str(home)}
    return subprocess.run([KVSIDE, *args], capture_output=True, text=True, timeout=180, env=env)


def test_session_round_trip_through_the_cli(tmp_path):
    home = tmp_path / "home"
    out = run(home, "ask", "--session", "trip", "-t", "0", "-n", "8", "--n-ctx", "512", "I am going to Oslo.")
    assert out.returncode == 0, out.stderr
    listed = json.loads(run(home, "sessions", "--json").stdout)
    assert [r["name"] for r in listed] == ["trip"] and listed[0]["cells"] > 0
    target = tmp_path / "trip.kvs"
    assert run(home, "save", "trip", str(target)).returncode == 0
    info = json.loads(run(home, "inspect", str(target), "--json").stdout)
    assert info["checksum"] == "ok" and info["matches_model"] and info["name"] == "trip"
    out = run(home, "restore", str(target), "--as", "trip2")
    assert out.returncode == 0, out.stderr
    shown = json.loads(run(home, "sessions", "show", "trip2", "--json").stdout)
    assert shown["name"] == "trip2" and shown["n_cells"] == info["n_cells"]
    again = run(home, "ask", "--session", "trip2", "-t", "0", "-n", "8", "--n-ctx", "512", "Where am I going?")
    assert again.returncode == 0, again.stderr
    assert run(home, "sessions", "rm", "trip2").returncode == 0
    assert [r["name"] for r in json.loads(run(home, "sessions", "--json").stdout)] == ["trip"]


def test_cli_refuses_bad_files_and_names(tmp_path):
    home = tmp_path / "home"
    junk = tmp_path / "junk.kvs"
    junk.write_bytes(b"\x00" * 100)
    for args, message in [
        (("restore", str(junk)), "not a kvside session"),
        (("inspect", str(tmp_path / "missing.kvs")), "no such session file"),
        (("save", "../escape"), "invalid session name"),
        (("sessions", "show", "nobody"), "no saved session"),
    ]:
        out = run(home, *args)
        assert out.returncode != 0 and message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
