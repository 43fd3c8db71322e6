"""Tests for tasktrain.py: a real daemon on port 0, real scripts, real HTTP.

Run with:  python3 -m pytest -q test_tasktrain.py

Each test is named after the rule it checks (the README and the project's contract
say the rules). Waits poll the real API against a deadline; nothing sleeps hoping
it is long enough.
"""

import base64
import contextlib
import functools
import hashlib
import hmac
import html
import http.client
import http.server
import json
import logging
import os
import re
import resource
import shutil
import shlex
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import queue
import threading
import time
import urllib.parse

import pytest

import tasktrain

TASKTRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasktrain.py")
# The daemon needs nothing outside the standard library: -S leaves site-packages out,
# which shows it, and skips site's start-up (60 of the 70 ms Python took to start here).
PYTHON = (sys.executable, "-S")
DEADLINE_S = 15


# ----------------------------------------------------------------------------
# Helpers: a daemon in a subprocess, scripts in tmp_path, HTTP
# ----------------------------------------------------------------------------

class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self):
        return self.body.decode()

    def json(self):
        return json.loads(self.body)


class Daemon:
    """tasktrain.py as a user runs it, with its own scripts and state under `root`."""

    def __init__(self, root, *options, env=None, wrapper=None):
        self.root = root
        self.scripts = root / "scripts.d"
        self.state = root / "state"
        self.stderr_path = root / "daemon.stderr"
        cmd = [*PYTHON, *(["-c", wrapper] if wrapper else []), TASKTRAIN, "--port", "0",
               "--scripts-dir", str(self.scripts), "--state-dir", str(self.state), *options]
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                         env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline()
        match = re.fullmatch(r"Server running at http://127\.0\.0\.1:(\d+)\n", line)
        assert match, f"no announcement: {line!r}; stderr: {self.stderr()}"
        self.port = int(match.group(1))

    def stderr(self):
        return self.stderr_path.read_text()

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE_S)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def submit(self, name, expect=201, body=None, headers=None, **params):
        resp = self.request("POST", "/task?" + urllib.parse.urlencode({"name": name, **params}),
                            body=body, headers=headers)
        assert resp.status == expect, resp.text
        return record_fields(resp.text)["ID"] if resp.status in (200, 201) else resp

    def task(self, task_id):
        return self.get(f"/tasks/{task_id}", headers={"Accept": "application/json"}).json()

    def wait_status(self, task_id, *statuses, timeout=DEADLINE_S):
        """The task's JSON once its status is one of `statuses` (default: finished)."""
        statuses = statuses or tasktrain.FINISHED

        def reached():
            task = self.task(task_id)
            return task if task["status"] in statuses else None
        return wait_for(reached, timeout, f"task {task_id} never reached {statuses}")

    def log(self, task_id):
        return self.get(f"/tasks/{task_id}/log").text

    def signal(self, signum):
        self.proc.send_signal(signum)
        return self.proc.wait(DEADLINE_S)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def wait_for(predicate, timeout=DEADLINE_S, message="condition never held"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(message)


def add_script(root, task, filename, text, mode=0o755):
    folder = root / "scripts.d" / task
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(text if text.startswith("#!") else "#!/bin/sh\n" + text)
    path.chmod(mode)
    return path


def record_fields(text):
    """The seven labelled lines of a record as a dict; RESULTS holds the rest."""
    head, _, results = text.partition("RESULTS: ")
    fields = dict(line.split(":", 1) for line in head.splitlines())
    fields = {k: v[9 - len(k) - 1:] for k, v in fields.items()}
    fields["RESULTS"] = results
    return fields


def raw_exchange(port, data, timeout=5):
    """Send raw bytes; returns what the server answered until it closed or went quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    head = b"".join(chunks).split(b"\r\n\r\n")[0]
                    m = re.search(rb"Content-Length: (\d+)", head)
                    if m and len(b"".join(chunks)) >= len(head) + 4 + int(m.group(1)):
                        break
        except socket.timeout:
            pass
    return b"".join(chunks)


def gone(pid):
    """True once a process has exited (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def daemons(tmp_path):
    started = []

    def start(*options, env=None, wrapper=None):
        daemon = Daemon(tmp_path, *options, env={"GO": str(tmp_path / "go"), **(env or {})},
                        wrapper=wrapper)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


# A script body that holds its task running until the test creates the file $GO
# (every test daemon has GO=tmp_path/go in its environment).
UNTIL_GO = 'while [ ! -e "$GO" ]; do sleep 0.01; done\n'
ARGS_SCRIPT = 'for a; do echo "arg: $a"; done\n'


@pytest.fixture
def daemon(tmp_path, daemons):
    add_script(tmp_path, "example", "args.sh", ARGS_SCRIPT)
    return daemons()


def example_daemon(root):
    """A daemon whose one task, `example`, prints its arguments."""
    add_script(root, "example", "args.sh", ARGS_SCRIPT)
    return Daemon(root)


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One daemon shared by tests that look only at the answers to their own requests."""
    d = example_daemon(tmp_path_factory.mktemp("shared"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def idle_daemon(tmp_path_factory):
    """One daemon shared by the table tests that must store nothing; each checks it."""
    d = example_daemon(tmp_path_factory.mktemp("idle"))
    yield d
    assert d.get("/tasks?format=json").json() == []
    d.stop()


# ----------------------------------------------------------------------------
# §1 Running it
# ----------------------------------------------------------------------------

def test_start_creates_missing_folders_and_says_where_scripts_go(tmp_path, daemons):
    d = daemons()
    assert d.scripts.is_dir() and d.state.is_dir()
    assert str(d.scripts) in d.stderr()


@pytest.mark.parametrize("argv", [
    ["--port", "abc"], ["--bogus"], ["--keep", "-1"], ["--port", "70000"],
    ["--host", "0.0.0.0"], ["--host=0.0.0.0"],
    # Past threading.TIMEOUT_MAX a timer thread dies, and the stop crashes.
    ["--grace", "inf"], ["--grace", "nan"], ["--timeout", "1e20"], ["--timeout", "-1"],
    ["--timeout", "1_0"], ["--grace", "\u0661"],
])
def test_bad_options_exit_2_with_usage(argv, tmp_path):
    proc = subprocess.run([*PYTHON, TASKTRAIN, "--state-dir", str(tmp_path), *argv],
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: tasktrain.py")


def test_public_host_without_token_says_how_to_proceed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tasktrain.parse_args(["--host", "192.0.2.1"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "not a loopback address" in message and "--token" in message and "--insecure" in message
    assert tasktrain.parse_args(["--host", "192.0.2.1", "--insecure"]).insecure
    assert tasktrain.parse_args(["--host=192.0.2.1", "--token", "t"]).token == "t"
    assert tasktrain.parse_args(["--host=::1"]).host == "::1"


def test_a_second_daemon_on_the_same_state_dir_refuses_to_start(tmp_path, daemons):
    d = daemons()
    proc = subprocess.run([*PYTHON, TASKTRAIN, "--port", "0", "--state-dir", str(d.state),
                           "--scripts-dir", str(d.scripts)],
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 1
    assert "another Task Train is using" in proc.stderr and proc.stdout == ""
    assert d.get("/").status == 200


def test_a_port_in_use_is_an_error_not_a_crash(tmp_path, daemons):
    d = daemons()
    proc = subprocess.run([*PYTHON, TASKTRAIN, "--port", str(d.port),
                           "--state-dir", str(tmp_path / "other")],
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 1 and "cannot listen" in proc.stderr


@pytest.mark.parametrize("layout, argv, message", [
    ("file", ["--state-dir", "{tmp}/file"], "cannot use {tmp}/file: it is not a folder"),
    ("file", ["--scripts-dir", "{tmp}/file/scripts.d"], "cannot use {tmp}/file/scripts.d: "),
    ("junk db", ["--state-dir", "{tmp}"], "cannot open the task database in {tmp}: "),
])
def test_an_unusable_folder_or_database_is_one_line_and_exit_1(layout, argv, message, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder\n")
    if layout == "junk db":
        (tmp_path / "tasks.sqlite3").write_text("not a database\n" * 100)
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    proc = subprocess.run([*PYTHON, TASKTRAIN, "--port", "0", "--state-dir",
                           str(tmp_path / "state"), *argv],
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 1 and proc.stdout == ""
    assert message.format(tmp=tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_version_and_help_exit_0():
    for flag in ("--version", "--help"):
        proc = subprocess.run([*PYTHON, TASKTRAIN, flag], capture_output=True, text=True,
                              timeout=DEADLINE_S)
        assert proc.returncode == 0 and proc.stdout


def test_a_stop_takes_one_grace_also_for_what_earlier_scripts_left(tmp_path, daemons):
    add_script(tmp_path, "deploy", "1", "(trap '' TERM; exec sleep 30) &\n")  # outlives it
    add_script(tmp_path, "deploy", "2", "trap '' TERM; echo started; sleep 30\n")
    d = daemons("--grace", "1")
    task_id = d.submit("deploy")
    wait_for(lambda: "started" in d.log(task_id))
    started = time.monotonic()
    assert d.signal(signal.SIGTERM) == 0
    assert time.monotonic() - started < 1.8  # one grace of 1 s, not one per group
    assert "Stopped 1 process left running" in (d.state / "logs" / f"{task_id}.log").read_text()


def test_a_stop_takes_one_grace_also_for_what_a_stopped_script_leaves_behind(tmp_path, daemons):
    add_script(tmp_path, "deploy", "run", "trap 'sleep 0.8; exit 0' TERM\n"  # exits late
               "(trap '' TERM; exec sleep 30) &\necho started\nwhile :; do sleep 0.05; done\n")
    d = daemons("--grace", "1")
    task_id = d.submit("deploy")
    wait_for(lambda: "started" in d.log(task_id))
    started = time.monotonic()
    assert d.signal(signal.SIGTERM) == 0
    assert time.monotonic() - started < 1.6  # one grace of 1 s from the signal, not 0.8 s + 1


def test_sigterm_fails_running_task_keeps_pending_and_exits_0(tmp_path, daemons):
    add_script(tmp_path, "slow", "run", "echo started; trap '' TERM; sleep 30\n")
    add_script(tmp_path, "quick", "run", "exit 0\n")
    d = daemons("--grace", "0.5")
    slow = d.submit("slow")
    wait_for(lambda: "started" in d.log(slow))
    queued = [d.submit("quick", n=str(i)) for i in range(3)]
    assert d.signal(signal.SIGTERM) == 0

    d = daemons()
    assert "3 task(s) pending" in d.stderr()
    task = d.wait_status(slow)
    assert task["status"] == "failed"
    assert "SIGTERM" in d.log(slow)
    for task_id in queued:
        assert d.wait_status(task_id)["status"] == "complete"


def test_a_stop_ends_follow_streams_properly_with_the_last_lines(tmp_path, daemons):
    add_script(tmp_path, "slow", "run", "echo started; sleep 30\n")
    d = daemons("--grace", "5")
    running, pending = d.submit("slow"), d.submit("slow", n="2")
    wait_for(lambda: "started" in d.log(running))
    streams = []
    for task_id in (running, pending):
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=DEADLINE_S)
        conn.request("GET", f"/tasks/{task_id}/log?follow=1")
        streams.append(conn.getresponse())
    assert d.signal(signal.SIGTERM) == 0
    # read() raises IncompleteRead if a chunked answer is cut off before its end
    followed_running, followed_pending = (resp.read().decode() for resp in streams)
    assert followed_running.startswith(f"{d.scripts}/slow/run --name=slow\nstarted\n")
    assert followed_running.endswith("exit code: 143\n\nTask Train was stopped (SIGTERM) "
                                     "while this task ran; its scripts were stopped.\n")
    assert followed_pending == ""


@pytest.mark.parametrize("command", ["submit", "log"])
def test_a_followed_task_that_a_stop_ends_exits_the_client_1(tmp_path, daemons, command):
    """SPEC 9: 1 when it fails; the daemon stops listening before the stream ends."""
    add_script(tmp_path, "slow", "run", "echo started; sleep 30\n")
    d = daemons("--grace", "5")
    running = d.submit("slow") if command == "log" else None
    args = ["--follow"] + ([running] if running else ["slow"])
    with subprocess.Popen([*PYTHON, TASKTRAIN, command, "--url", f"http://127.0.0.1:{d.port}",
                           *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as follower:
        lines = []  # what it has printed; read beside it, so that every wait has a deadline
        reader = threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True)
        reader.start()
        try:
            wait_for(lambda: "started\n" in lines)
            assert d.signal(signal.SIGTERM) == 0
            follower.wait(timeout=DEADLINE_S)  # its stderr is two lines: no pipe fills
            reader.join(DEADLINE_S)
            err = follower.stderr.read()
        finally:
            follower.kill()
    out = "".join(lines)
    assert re.fullmatch(r"\S+/slow/run --name=slow\nstarted\nexit code: 143\n\nTask Train was "
                        r"stopped \(SIGTERM\) while this task ran; its scripts were stopped\.\n",
                        out), out
    assert err.endswith(" failed.\n") and follower.returncode == 1, err


def test_a_follow_whose_early_wait_ran_out_asks_for_the_outcome_again(tmp_path, daemons,
                                                                       capfd, monkeypatch):
    add_script(tmp_path, "slow", "run", "sleep 1.5; echo done\n")
    d = daemons()
    monkeypatch.setattr(tasktrain, "MAX_WAIT_S", 1)  # the wait sent first gets a 202
    code, out, err = in_process(d, capfd, "submit", "slow", "--follow")
    assert (code, out.endswith("done\nexit code: 0\n\n")) == (0, True), err
    assert err.endswith(" complete.\n")


def test_under_nohup_sighup_stays_ignored_by_the_daemon_and_its_scripts(tmp_path, daemons):
    add_script(tmp_path, "hup", "run", "kill -HUP $$; echo alive\n")
    nohup = ("import os, signal, sys\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
             "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")
    d = daemons(wrapper=nohup)
    d.proc.send_signal(signal.SIGHUP)
    assert "alive\nexit code: 0" in d.wait_status(d.submit("hup"))["output"]
    assert "SIGHUP" not in d.stderr() and d.proc.poll() is None


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_also_stop_cleanly(tmp_path, daemons, signum):
    add_script(tmp_path, "slow", "run", "sleep 300\n")
    d = daemons()
    slow = d.submit("slow")
    d.wait_status(slow, "running")
    assert d.signal(signum) == 0
    name = signal.Signals(signum).name
    assert f"{name}: stopping" in d.stderr()
    d = daemons()
    assert d.wait_status(slow)["status"] == "failed"
    assert f"Task Train was stopped ({name}) while this task ran" in d.log(slow)


# ----------------------------------------------------------------------------
# §2 The task record
# ----------------------------------------------------------------------------

def test_record_is_seven_lines_byte_for_byte(daemon):
    resp = daemon.request("POST", "/task?name=example&myparam=testvalue&path=/a/b&word=caf%C3%A9")
    lines = resp.text.split("\n")
    assert [line[:9] for line in lines[:7]] == [
        "ID:      ", "NAME:    ", "PARAMS:  ", "STATUS:  ", "CREATED: ", "PROCESS: ", "RESULTS: "]
    task_id = lines[0][9:]
    assert re.fullmatch(r"[0-9a-f]{13}", task_id)
    created = time.strftime("%a, %d %b %Y %H:%M:%S %z",
                            time.localtime(int(task_id[:8], 16)))
    assert resp.text == (
        f"ID:      {task_id}\n"
        "NAME:    example\n"
        'PARAMS:  {"myparam":"testvalue","path":"\\/a\\/b","word":"caf\\u00e9"}\n'
        "STATUS:  pending\n"
        f"CREATED: {created}\n"
        f"PROCESS: {daemon.scripts}/example/* --name=example --myparam=testvalue --path=/a/b "
        "'--word=café'\n"
        "RESULTS: \n")


@pytest.mark.parametrize("params, expected", [
    ({}, "[]"),
    ({"a": "1"}, '{"a":"1"}'),
    ({"0": "x", "1": "y"}, '["x","y"]'),
    ({"1": "x"}, '{"1":"x"}'),
    ({"q": 'say "hi"\n\t<b>&'}, '{"q":"say \\"hi\\"\\n\\t<b>&"}'),
    ({"e": "\U0001F600"}, '{"e":"\\ud83d\\ude00"}'),
    ({"d": "\x7f"}, '{"d":"\x7f"}'),  # PHP escapes below 0x20 only
    ({"b": "\\u007f"}, '{"b":"\\\\u007f"}'),
])
def test_params_line_is_php_json_encode(shared_daemon, params, expected):
    resp = shared_daemon.request("POST", "/task?" + urllib.parse.urlencode({"name": "example",
                                                                            **params}))
    assert resp.status in (200, 201) and record_fields(resp.text)["PARAMS"] == expected


def test_process_line_quotes_each_argument_and_stays_one_line(daemon):
    resp = daemon.request("POST", "/task?" + urllib.parse.urlencode(
        {"name": "example", "msg": "two words", "nl": "a\nb", "nel": "a\x85b",
         "ls": "a\u2028b", "del": "a\x7fb"}))
    fields = record_fields(resp.text)
    assert fields["PROCESS"] == (f"{daemon.scripts}/example/* --name=example "
                                 "'--msg=two words' $'--nl=a\\nb' $'--nel=a\\xc2\\x85b' "
                                 "$'--ls=a\\xe2\\x80\\xa8b' $'--del=a\\x7fb'")
    assert len(resp.text.splitlines()) == 7  # which breaks at U+0085 and U+2028 too
    assert len(resp.text.split("\n")) == 8


def test_ids_increase_across_restarts_though_keep_0_pruned_them_all(tmp_path, monkeypatch):
    """SPEC 2: increasing within one state dir; the clock may step back meanwhile."""
    store = tasktrain.TaskStore(str(tmp_path), keep=0)
    first, newest = store.submit("a", {}).task.id, store.submit("b", {}).task.id
    store.cancel_pending(newest)
    store.cancel_pending(first)  # the older id is pruned last: the newest stays known
    assert store.get(first) is None and store.get(newest) is None
    store.close()
    real_now_us = tasktrain.now_us
    monkeypatch.setattr(tasktrain, "now_us", lambda: real_now_us() - 120_000_000)
    store = tasktrain.TaskStore(str(tmp_path), keep=0)
    try:
        assert store.submit("c", {}).task.id > newest
    finally:
        store.close()


def test_ids_are_unique_and_increasing_across_restarts(tmp_path, daemons):
    add_script(tmp_path, "example", "run", "exit 0\n")
    d = daemons()
    ids = [d.submit("example", i=str(i)) for i in range(20)]
    d.stop()
    d = daemons()
    ids += [d.submit("example", i=str(i)) for i in range(20, 25)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{13}", i) for i in ids)
    assert abs(int(ids[-1][:8], 16) - time.time()) < 60


def test_id_clock_never_repeats_within_a_microsecond(tmp_path):
    store = tasktrain.TaskStore(str(tmp_path))
    ids = [store.submit("example", {"i": str(i)}).task.id for i in range(200)]
    store.close()
    assert ids == sorted(set(ids))


def test_a_failed_commit_leaves_the_queue_as_the_table_has_it(tmp_path):
    store = tasktrain.TaskStore(str(tmp_path))
    first = store.submit("example", {"i": "1"}).task
    second = store.submit("example", {"i": "2"}).task
    claim = store.start_claiming()
    claim.synced()
    assert store.claim() is None  # one task at a time
    with pytest.raises(sqlite3.IntegrityError):  # status may not be NULL
        store.finish(claim.task.id, None, 0, [], claim_next=True)
    assert (claim.task.id, store.status(first.id)) == (first.id, "running")
    assert store.pending_count() == 1 and store.position(second.id) == 1
    assert store.submit("example", {"i": "2"}).is_new is False  # still coalesces with it
    store.close()


def test_an_idle_runner_is_handed_the_task_in_the_commit_that_queues_it(tmp_path):
    store = tasktrain.TaskStore(str(tmp_path))
    assert store.start_claiming() is None  # the runner is ready; nothing waits
    handed = []
    first, second = (store.submit("example", {"i": i}, on_claimed=handed.append) for i in "12")
    assert (first.task.status, first.position) == ("pending", 1)  # the answer: as queued
    assert [claim.task.id for claim in handed] == [first.task.id]  # one task at a time
    assert store.status(first.task.id) == "running" and store.claim() is None
    assert store.position(second.task.id) == 1
    claim = store.finish(first.task.id, "complete", 0, [], claim_next=True)
    assert claim.task.id == second.task.id
    store.close()


def start_runner(tmp_path, grace_s=tasktrain.DEFAULT_GRACE_S):
    """A store under tmp_path/state and its runner, started, in this process, and
    ready: a submission from here on is handed over to it."""
    store = tasktrain.TaskStore(str(tmp_path / "state"))
    runner = tasktrain.Runner(store, str(tmp_path / "scripts.d"), "scripts.d", grace_s=grace_s)
    runner.start()
    wait_for(lambda: store._claiming)
    return store, runner


def test_a_cancel_between_a_tasks_claim_and_its_first_script_says_it_never_ran(tmp_path):
    add_script(tmp_path, "deploy", "run", 'touch "$0.ran"\n')
    store = tasktrain.TaskStore(str(tmp_path / "state"))
    runner = tasktrain.Runner(store, str(tmp_path / "scripts.d"), "scripts.d")
    task_id = store.submit("deploy", {}).task.id
    claim = store.start_claiming()  # claimed, as the runner thread would
    assert runner.stop(task_id, "cancelled", tasktrain.CANCELLED_RUNNING) is None
    outcome = runner._run(claim)  # the runner thread's step, run here
    assert outcome == tasktrain.Outcome("cancelled", None, [])
    assert not (tmp_path / "scripts.d" / "deploy" / "run.ran").exists()
    with open(store.log_path(task_id)) as log:
        assert log.read() == tasktrain.CANCELLED_PENDING + "\n"
    store.close()


def test_a_cancel_reaches_a_task_whose_body_has_no_room_yet(tmp_path):
    """A task whose stdin file cannot be written (a full disk) waits for room; a cancel
    meanwhile ends it, and its log says it never ran."""
    add_script(tmp_path, "deploy", "run", 'touch "$0.ran"\n')
    store = tasktrain.TaskStore(str(tmp_path / "state"))
    runner = tasktrain.Runner(store, str(tmp_path / "scripts.d"), "scripts.d")
    submitted = store.submit("deploy", {}, body=b"x" * 200_000)
    submitted.synced()
    task_id, claim = submitted.task.id, store.start_claiming()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limit[1]))  # no room for the body
    try:
        assert runner._run(claim).status == tasktrain.NO_ROOM  # the runner thread's steps
        assert runner.stop(task_id, "cancelled", tasktrain.CANCELLED_RUNNING) is None
        outcome = runner._run(claim)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, ignored)
    assert (outcome.status, outcome.exit_code) == ("cancelled", None)
    assert not (tmp_path / "scripts.d" / "deploy" / "run.ran").exists()
    runner._write_notes()  # as the runner does once there is room
    with open(store.log_path(task_id)) as log:
        assert log.read() == tasktrain.CANCELLED_PENDING + "\n"
    store.close()


@contextlib.contextmanager
def store_refuses_status(state_dir, status=None):
    """While inside, the task database refuses to set a task's status (to `status`,
    or to any), as a full disk would: a trigger aborts the write."""
    db = sqlite3.connect(state_dir / "tasks.sqlite3")
    when = f"WHEN NEW.status = '{status}' " if status else ""
    db.execute("CREATE TRIGGER disk_full BEFORE UPDATE OF status ON tasks "
               f"{when}BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    db.commit()
    try:
        yield
    finally:
        db.execute("DROP TRIGGER disk_full")
        db.commit()
        db.close()


def test_a_failed_commit_undoes_the_claim_made_in_it(tmp_path):
    store = tasktrain.TaskStore(str(tmp_path))
    store.start_claiming()
    handed = []
    with store_refuses_status(tmp_path):
        with pytest.raises(sqlite3.DatabaseError):
            store.submit("example", {"i": "1"}, on_claimed=handed.append)
    assert store.pending_count() == 0 and not handed  # nothing queued, nothing claimed
    store.submit("example", {"i": "2"}, on_claimed=handed.append)
    assert len(handed) == 1
    store.close()


def test_one_sync_commits_every_submission_that_came_before_it(tmp_path):
    store = tasktrain.TaskStore(str(tmp_path))
    first, second = (store.submit("example", {"i": str(i)}) for i in (1, 2))
    other = sqlite3.connect(tmp_path / "tasks.sqlite3")  # sees committed rows only
    assert other.execute("SELECT count(*) FROM tasks").fetchone() == (0,)
    second.synced()
    assert other.execute("SELECT count(*) FROM tasks").fetchone() == (2,)
    first.synced()  # already on disk: returns at once
    other.close()
    store.close()


def test_a_process_group_is_committed_at_once_with_the_submissions_waiting_to_be(tmp_path):
    store = tasktrain.TaskStore(str(tmp_path))
    store.start_claiming()
    running = store.submit("example", {"i": "1"}, on_claimed=lambda claim: None).task
    other = sqlite3.connect(tmp_path / "tasks.sqlite3")  # sees committed rows only
    store.record_process(running.id, 4242)  # no transaction open: it commits itself
    assert other.execute("SELECT pgid FROM tasks").fetchall() == [(4242,)]
    waiting = store.submit("example", {"i": "2"}).task  # left for a sync to commit
    assert other.execute("SELECT count(*) FROM tasks").fetchone() == (1,)
    store.record_process(running.id, 4343)
    assert other.execute("SELECT id, pgid FROM tasks ORDER BY id").fetchall() == [
        (running.id, 4343), (waiting.id, None)]
    other.close()
    store.close()


def test_a_submission_not_yet_synced_is_undone_with_a_later_write_that_fails(tmp_path):
    db = sqlite3.connect(tmp_path / "tasks.sqlite3")
    db.executescript(tasktrain.SCHEMA)
    db.execute("CREATE TRIGGER disk_full BEFORE INSERT ON tasks WHEN NEW.params LIKE "
               "'%\"2\"%' BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    db.close()
    store = tasktrain.TaskStore(str(tmp_path))
    first = store.submit("example", {"i": "1"})
    with pytest.raises(sqlite3.IntegrityError):
        store.submit("example", {"i": "2"})
    with pytest.raises(sqlite3.OperationalError, match="disk full"):
        first.synced()  # its answer would be a 503, not a 2xx
    assert store.pending_count() == 0 and store.get(first.task.id) is None
    third = store.submit("example", {"i": "3"})
    third.synced()
    assert store.status(third.task.id) == "pending"
    store.close()


def test_a_task_whose_end_cannot_be_written_still_holds_the_runner(tmp_path):
    store = tasktrain.TaskStore(str(tmp_path))
    store.start_claiming()
    handed = []
    first = store.submit("example", {"i": "1"}, on_claimed=handed.append).task
    with store_refuses_status(tmp_path, "complete"):
        with pytest.raises(sqlite3.DatabaseError):
            store.finish(first.id, "complete", 0, [], claim_next=True)
        second = store.submit("example", {"i": "2"}, on_claimed=handed.append).task
        assert len(handed) == 1 and store.claim() is None  # still one task at a time
    claim = store.finish(first.id, "complete", 0, [], claim_next=True)  # the retry
    assert claim.task.id == second.id and store.status(first.id) == "complete"
    store.close()


def test_a_task_whose_end_cannot_be_written_is_not_run_again_after_a_stop(tmp_path):
    add_script(tmp_path, "example", "run", f'echo ran >> "{tmp_path}/ran"\n')
    store, runner = start_runner(tmp_path)
    with store_refuses_status(tmp_path / "state", "complete"):
        task = store.submit("example", {}, on_claimed=runner.hand_over).task
        wait_for(lambda: (tmp_path / "ran").exists())
        runner.shutdown("stopped")  # while it tries again to write the task's end
        assert store.status(task.id) == "running" and store.pending_count() == 0
    store.close()
    store = tasktrain.TaskStore(str(tmp_path / "state"))  # the next start
    assert store.status(task.id) == "failed" and store.start_claiming() is None
    store.close()


def test_a_task_handed_over_but_not_started_stays_first_in_line_when_the_runner_stops(tmp_path):
    store = tasktrain.TaskStore(str(tmp_path))
    store.start_claiming()
    handed = []
    first, twin = (store.submit("example", {"i": "1"}, on_claimed=handed.append).task
                   for _ in range(2))  # twin: identical, queued once first was running
    store.stop_claiming()
    assert [store.position(t.id) for t in (first, twin)] == [1, 2]
    assert store.claim() is None and len(handed) == 1
    store.close()
    store = tasktrain.TaskStore(str(tmp_path))  # the next start runs both, in order
    assert store.start_claiming().task.id == first.id
    assert store.finish(first.id, "complete", 0, [], claim_next=True).task.id == twin.id
    store.close()


def test_a_task_the_daemon_stops_before_its_first_script_stays_first_in_line(tmp_path):
    add_script(tmp_path, "example", "run", f'touch "{tmp_path}/ran"\n')
    store, runner = start_runner(tmp_path)
    stopping = threading.Thread(target=runner.shutdown, args=("stopped",))

    def stop_while_syncing(claim):  # the daemon is told to stop during the fsync
        def sync_then_stop():
            claim.synced()
            stopping.start()
            wait_for(lambda: not runner.handed_over.empty())  # shutdown's last word is queued
        runner.hand_over(claim._replace(synced=sync_then_stop))

    task = store.submit("example", {}, on_claimed=stop_while_syncing).task
    wait_for(lambda: stopping.ident)
    stopping.join(DEADLINE_S)
    assert not stopping.is_alive()
    assert (store.status(task.id), store.position(task.id)) == ("pending", 1)
    assert not (tmp_path / "ran").exists()
    store.close()


def test_a_stop_that_comes_after_its_task_ended_is_forgotten_by_the_next(tmp_path):
    add_script(tmp_path, "example", "run", "exit 0\n")
    store, runner = start_runner(tmp_path)
    first = store.submit("example", {"i": "1"}, on_claimed=runner.hand_over).task
    assert runner.wait_finished(first.id, DEADLINE_S)
    runner.stop(first.id, "cancelled", "too late")  # a cancel that lost the race
    second = store.submit("example", {"i": "2"}, on_claimed=runner.hand_over).task
    assert runner.wait_finished(second.id, DEADLINE_S)
    assert store.status(second.id) == "complete" and runner._stops == {}
    runner.shutdown("stopped")
    store.close()


def test_a_stopped_runner_is_handed_nothing_more(tmp_path):
    store, runner = start_runner(tmp_path)
    runner.shutdown("stopped")
    task = store.submit("example", {}, on_claimed=runner.hand_over).task
    assert store.status(task.id) == "pending"
    store.close()


def test_results_hold_command_stdout_stderr_and_exit_code(tmp_path, daemons):
    add_script(tmp_path, "both", "a.sh", "echo out; echo err >&2; echo out2\n")
    d = daemons()
    task_id = d.submit("both", x="1")
    d.wait_status(task_id)
    record = d.get(f"/tasks/{task_id}").text
    assert record_fields(record)["RESULTS"] == (
        f"{d.scripts}/both/a.sh --name=both --x=1\nout\nerr\nout2\nexit code: 0\n\n\n")


# ----------------------------------------------------------------------------
# §3 HTTP API
# ----------------------------------------------------------------------------

def test_home_says_it_is_running(idle_daemon):
    resp = idle_daemon.get("/")
    assert (resp.status, resp.body) == (200, b"Task Manager is running!")


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/tasks"), ("GET", "/nope"), ("POST", "/task?name=x"),
    ("PUT", "/tasks"), ("GET", "/tasks?format=json"),
])
def test_every_response_has_length_charset_nosniff_and_request_count(idle_daemon, method, path):
    first = idle_daemon.request(method, path)
    second = idle_daemon.request(method, path)
    for resp in (first, second):
        assert "charset=utf-8" in resp.headers["Content-Type"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert (resp.headers["Content-Length"] == str(len(resp.body))
                or resp.headers["Transfer-Encoding"] == "chunked")
    assert int(second.headers["X-Req-Count"]) == int(first.headers["X-Req-Count"]) + 1


def test_keep_alive_serves_many_requests_on_one_connection(idle_daemon):
    conn = http.client.HTTPConnection("127.0.0.1", idle_daemon.port, timeout=DEADLINE_S)
    for _ in range(5):
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.read() == b"Task Manager is running!" and resp.version == 11
    conn.close()


def test_submit_answers_201_with_record_and_location(daemon):
    resp = daemon.request("POST", "/task?name=example")
    task_id = record_fields(resp.text)["ID"]
    assert resp.status == 201
    assert resp.headers["Location"] == f"tasks/{task_id}"
    assert record_fields(resp.text)["PARAMS"] == "[]"


@pytest.mark.parametrize("query", [
    "", "name=", "name=ab", "name=Example", "name=a" * 1 + "b" * 24, "name=ex%20ample",
    "name=../etc", "name=ex.ample", "other=1",
])
def test_bad_or_missing_name_is_400_and_queues_nothing(idle_daemon, query):
    resp = idle_daemon.request("POST", "/task?" + query)
    assert (resp.status, resp.text) == (400, "Bad or missing name parameter.\n")
    assert idle_daemon.get("/tasks?format=json").json() == []


def test_unknown_task_or_folder_without_executables_is_404(tmp_path, daemon):
    add_script(tmp_path, "notes", "README", "just text\n", mode=0o644)
    for name in ("nosuchtask", "notes"):
        resp = daemon.request("POST", f"/task?name={name}")
        assert resp.status == 404
        assert name in resp.text and f"{daemon.scripts}/{name}/" in resp.text
    assert daemon.get("/tasks?format=json").json() == []


@pytest.mark.parametrize("query, reason", [
    ("bad%20key=1", "Bad parameter name"),
    (".hidden=1", "Bad parameter name"),
    ("k" * 65 + "=1", "Bad parameter name"),
    ("v=" + "x" * (8 * 1024 + 1), "longer than"),
    ("v=a%00b", "NUL"),
    ("v=%zz", "percent-encoding"),
    ("v=%4", "percent-encoding"),
    ("v=%ff%fe", "UTF-8"),
    ("&".join(f"k{i}=v" for i in range(101)), "Too many parameters"),
])
def test_bad_params_are_400_naming_the_problem(idle_daemon, query, reason):
    resp = idle_daemon.request("POST", "/task?name=example&" + query)
    assert resp.status == 400 and reason in resp.text
    assert resp.text.count("\n") == 1
    assert idle_daemon.get("/tasks?format=json").json() == []


def test_limits_accept_the_largest_valid_params(daemon):
    params = {f"k{i}": "v" for i in range(99)}
    params["K_9.a-" + "z" * 58] = "x" * (8 * 1024)
    task_id = daemon.submit("example", **params)
    assert daemon.task(task_id)["params"] == params


def test_form_body_gives_params_and_later_values_win(tmp_path, daemon):
    resp = daemon.request("POST", "/task?a=query&b=kept",
                          body="name=example&a=form&c=3",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 201
    assert record_fields(resp.text)["PARAMS"] == '{"a":"form","b":"kept","c":"3"}'


def test_identical_pending_submission_is_coalesced(tmp_path, daemons):
    add_script(tmp_path, "block", "run", UNTIL_GO)
    add_script(tmp_path, "example", "run", "exit 0\n")
    go = tmp_path / "go"
    d = daemons()
    blocker = d.submit("block")
    first = d.submit("example", a="1")
    assert d.submit("example", expect=200, a="1") == first
    assert d.submit("example", a="2") != first
    assert d.submit("example", body=b"{}", a="1",
                    headers={"Content-Type": "application/json"}) != first
    go.touch()
    d.wait_status(first)
    assert d.submit("example", a="1") != first  # only pending tasks coalesce
    assert d.wait_status(blocker)["status"] == "complete"


def test_more_than_10000_pending_is_503_with_retry_after(tmp_path, daemons):
    add_script(tmp_path, "example", "run", UNTIL_GO)
    (tmp_path / "state").mkdir()
    store = tasktrain.TaskStore(str(tmp_path / "state"))
    store.close()
    db = sqlite3.connect(tmp_path / "state" / "tasks.sqlite3")
    base_us = time.time_ns() // 1000 - 10**7
    db.executemany(
        "INSERT INTO tasks (id, name, params, body, fingerprint, status, created_us) "
        "VALUES (?, 'example', ?, x'', ?, 'pending', ?)",
        [(tasktrain.format_id(base_us + i), json.dumps({"i": str(i)}), str(i), base_us + i)
         for i in range(tasktrain.MAX_PENDING + 1)])
    db.commit()
    db.close()
    d = daemons()
    resp = d.request("POST", "/task?name=example&new=1")
    assert resp.status == 503 and int(resp.headers["Retry-After"]) > 0
    newest = d.get("/tasks?format=json&limit=1").json()
    assert [t["id"] for t in newest] == [tasktrain.format_id(base_us + tasktrain.MAX_PENDING)]


def test_unknown_task_id_and_path_are_404(idle_daemon):
    for path in ("/tasks/0123456789abc", "/tasks/xyz", "/nope", "/tasks/0123456789abc/log",
                 "/tasks/", "//tasks", "//", "/tasks//", "//127.0.0.1/tasks", "*"):
        resp = idle_daemon.get(path)
        assert (resp.status, resp.text) == (404, "Not found"), path  # as server.php


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/task", "POST"),
    ("POST", "/", "GET, HEAD"),
    ("DELETE", "/tasks", "GET, HEAD"),
    ("PUT", "/tasks/0123456789abc", "DELETE, GET, HEAD"),
    ("POST", "/tasks/0123456789abc/log", "GET, HEAD"),
    ("TRACE", "/task", "POST"),
    ("BREW", "/tasks", "GET, HEAD"),
    ("get", "/", "GET, HEAD"),  # methods are case-sensitive
])
def test_wrong_method_on_known_path_is_405_with_allow(idle_daemon, method, path, allow):
    resp = idle_daemon.request(method, path)
    assert resp.status == 405 and resp.headers["Allow"] == allow


def test_head_answers_headers_only(idle_daemon):
    resp = idle_daemon.request("HEAD", "/tasks")
    assert resp.status == 200 and resp.body == b""


# ----------------------------------------------------------------------------
# §3 JSON, logs, follow, cancel
# ----------------------------------------------------------------------------

def two_scripts_the_second_failing(tmp_path, daemons):
    """A daemon that ran task `two` (scripts a: echo one, b: exit 3) with k=v to its
    end; returns the daemon, the task's id and its JSON."""
    add_script(tmp_path, "two", "a", "echo one\n")
    add_script(tmp_path, "two", "b", "exit 3\n")
    d = daemons()
    task_id = d.submit("two", k="v")
    return d, task_id, d.wait_status(task_id)


def test_json_record_has_the_contract_fields(tmp_path, daemons):
    d, task_id, task = two_scripts_the_second_failing(tmp_path, daemons)
    assert set(task) == {"id", "name", "params", "status", "created", "started", "finished",
                         "exit_code", "process", "position", "scripts", "event", "delivery",
                         "ref", "commit", "superseded_by", "output"}
    assert [task[k] for k in ("event", "delivery", "ref", "commit")] == [None] * 4  # no forge's
    assert task["params"] == {"k": "v"} and task["status"] == "failed" and task["exit_code"] == 3
    assert task["process"] == [f"{d.scripts}/two/*", "--name=two", "--k=v"]
    assert [(s["path"], s["exit_code"]) for s in task["scripts"]] == [
        (f"{d.scripts}/two/a", 0), (f"{d.scripts}/two/b", 3)]
    assert all(s["seconds"] >= 0 for s in task["scripts"])
    assert task["output"].startswith(f"{d.scripts}/two/a --name=two --k=v\none\nexit code: 0\n")
    for key in ("created", "started", "finished"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", task[key])
    assert d.get(f"/tasks/{task_id}?format=json").json() == task


def test_json_list_leaves_output_out_and_numbers_the_queue(tmp_path, daemons):
    add_script(tmp_path, "block", "run", UNTIL_GO)
    d = daemons()
    ids = [d.submit("block", i=str(i)) for i in range(3)]
    d.wait_status(ids[0], "running")
    listed = d.get("/tasks", headers={"Accept": "application/json"}).json()
    assert [t["id"] for t in listed] == ids[::-1]
    assert [t["position"] for t in listed] == [2, 1, None]
    assert all("output" not in t for t in listed)
    assert d.task(ids[2])["position"] == 2
    (tmp_path / "go").touch()


def test_every_route_answers_json_when_asked(daemon):
    task_id = daemon.submit("example")
    daemon.wait_status(task_id)
    json_accept = {"Accept": "application/json"}
    for method, path in [("GET", "/"), ("GET", "/tasks"), ("GET", f"/tasks/{task_id}"),
                         ("GET", f"/tasks/{task_id}/log"), ("DELETE", f"/tasks/{task_id}"),
                         ("GET", "/nope"), ("PUT", "/tasks")]:
        resp = daemon.request(method, path, headers=json_accept)
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8", path
        resp.json()
    assert daemon.get(f"/tasks/{task_id}/log", headers=json_accept).json()["output"] == \
        daemon.log(task_id)


def test_errors_are_json_when_json_was_asked_for(idle_daemon):
    resp = idle_daemon.request("POST", "/task?name=x", headers={"Accept": "application/json"})
    assert resp.status == 400 and resp.json() == {"error": "Bad or missing name parameter."}


def test_text_list_gives_records_one_after_another(daemon):
    ids = [daemon.submit("example", i=str(i)) for i in range(2)]
    for task_id in ids:
        daemon.wait_status(task_id)
    text = daemon.get("/tasks?format=text").text
    assert [m for m in re.findall(r"^ID:      (\w+)$", text, re.M)] == ids[::-1]
    assert text.count("STATUS:  complete") == 2
    assert text == "".join(daemon.get(f"/tasks/{task_id}").text for task_id in ids[::-1])


def test_log_is_the_raw_output(daemon):
    task_id = daemon.submit("example", x="y")
    daemon.wait_status(task_id)
    assert daemon.log(task_id) == (f"{daemon.scripts}/example/args.sh --name=example --x=y\n"
                                   "arg: --name=example\narg: --x=y\nexit code: 0\n\n")


def test_follow_streams_output_before_the_task_ends(tmp_path, daemons):
    add_script(tmp_path, "block", "run", 'while [ ! -e "$GO.block" ]; do sleep 0.01; done\n')
    add_script(tmp_path, "talk", "run", "echo first\n" + UNTIL_GO + "echo second\n")
    go = tmp_path / "go"
    d = daemons()
    d.submit("block")
    task_id = d.submit("talk")
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=DEADLINE_S)
    conn.request("GET", f"/tasks/{task_id}/log?follow=1")
    resp = conn.getresponse()  # the task is still pending: the stream waits for it
    assert resp.headers["Transfer-Encoding"] == "chunked"
    (tmp_path / "go.block").touch()
    streamed = b""
    while b"first\n" not in streamed:
        streamed += resp.read1(65536)
    assert d.task(task_id)["status"] == "running"
    go.touch()
    streamed += resp.read()
    conn.close()
    assert streamed.decode() == d.log(task_id)
    assert streamed.endswith(b"second\nexit code: 0\n\n")


def test_cancel_pending_task_never_runs(tmp_path, daemons):
    add_script(tmp_path, "block", "run", UNTIL_GO)
    add_script(tmp_path, "mark", "run", 'echo "$2" >> "$GO.ran"\n')
    d = daemons()
    blocker = d.submit("block")
    victim = d.submit("mark", run="victim")
    resp = d.request("DELETE", f"/tasks/{victim}")
    assert resp.status == 200 and record_fields(resp.text)["STATUS"] == "cancelled"
    assert "it never ran" in record_fields(resp.text)["RESULTS"]
    (tmp_path / "go").touch()
    d.wait_status(blocker)
    d.wait_status(d.submit("mark", run="after"))
    assert (tmp_path / "go.ran").read_text() == "--run=after\n"
    assert d.task(victim)["status"] == "cancelled"
    assert d.request("DELETE", f"/tasks/{victim}").status == 409


def test_cancel_running_task_kills_its_whole_group(tmp_path, daemons):
    add_script(tmp_path, "stubborn", "run",
               "sh -c 'trap \"\" TERM; exec sleep 300' &\necho $! > \"$PIDS\"\nwait\n")
    pids = tmp_path / "pids"
    d = daemons("--grace", "0.5", env={"PIDS": str(pids)})
    task_id = d.submit("stubborn")
    wait_for(lambda: pids.exists() and pids.read_text().strip())
    child = int(pids.read_text())
    resp = d.request("DELETE", f"/tasks/{task_id}")
    assert resp.status == 200
    assert record_fields(resp.text)["STATUS"] == "cancelled"
    wait_for(lambda: gone(child), message="the background child survived the cancel")
    assert "cancelled" in d.log(task_id)
    assert d.request("DELETE", f"/tasks/{task_id}").status == 409


def test_cancel_counts_even_when_the_script_cleans_up_and_exits_0(tmp_path, daemons):
    add_script(tmp_path, "tidy", "run",
               "trap 'echo cleaned up; exit 0' TERM\necho started\n" + UNTIL_GO)
    d = daemons()
    task_id = d.submit("tidy")
    wait_for(lambda: "started" in d.log(task_id))
    resp = d.request("DELETE", f"/tasks/{task_id}")
    assert record_fields(resp.text)["STATUS"] == "cancelled"
    assert "cleaned up\nexit code: 0" in d.log(task_id)


# Orphans go to the nearest "subreaper" (Linux), as to PID 1 in a container: these
# run the daemon as one (its scripts' orphans become its children), or under one that
# never reaps them (a busy or careless PID 1).
AS_REAPER = ("import ctypes, os, sys\n"
             "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER\n"
             "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")
UNDER_IDLE_REAPER = ("import ctypes, signal, subprocess, sys\n"
                     "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)\n"
                     "daemon = subprocess.Popen([sys.executable] + sys.argv[1:])\n"
                     "signal.signal(signal.SIGTERM, lambda *_: daemon.terminate())\n"
                     "sys.exit(daemon.wait())\n")
BACKGROUND_JOBS = 'for i in 1 2; do sleep 300 & echo $! >> "$GO.pids"; done\nwait\n'


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="subreapers are Linux's")
@pytest.mark.parametrize("wrapper", [AS_REAPER, UNDER_IDLE_REAPER], ids=["own", "idle"])
def test_a_cancel_does_not_wait_for_the_reaping_of_exited_scripts(tmp_path, daemons, wrapper):
    add_script(tmp_path, "bgjobs", "run", BACKGROUND_JOBS)
    d = daemons("--grace", "10", wrapper=wrapper)
    task_id = d.submit("bgjobs")
    pids = tmp_path / "go.pids"
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2)
    started = time.monotonic()
    assert d.request("DELETE", f"/tasks/{task_id}").status == 200
    assert time.monotonic() - started < 5  # not the --grace of 10 s
    if wrapper == AS_REAPER:  # its own zombies, the daemon reaps
        assert not any(os.path.exists(f"/proc/{pid}") for pid in pids.read_text().split())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="subreapers are Linux's")
def test_as_the_reaper_it_collects_what_a_script_left_behind(tmp_path, daemons):
    add_script(tmp_path, "leave", "run", 'sleep 0.2 & echo $! > "$GO.pid"\n')
    add_script(tmp_path, "next", "run", "exit 0\n")
    d = daemons(wrapper=AS_REAPER)
    d.wait_status(d.submit("leave"))
    stat = f"/proc/{(tmp_path / 'go.pid').read_text().strip()}/stat"
    wait_for(lambda: not os.path.exists(stat) or " Z " in open(stat).read(),
             message="the background sleep never exited")
    d.wait_status(d.submit("next"))
    assert not os.path.exists(stat)  # reaped, not a zombie of the daemon


def test_timeout_kills_the_group_and_fails_the_task(tmp_path, daemons):
    add_script(tmp_path, "hang", "run", "sleep 300 &\necho $! > \"$PIDS\"\nwait\n")
    pids = tmp_path / "pids"
    d = daemons("--timeout", "0.5", "--grace", "0.5", env={"PIDS": str(pids)})
    task = d.wait_status(d.submit("hang"))
    assert task["status"] == "failed"
    assert "Timed out after 0.5 s." in task["output"]
    assert gone(int(pids.read_text()))


# ----------------------------------------------------------------------------
# §4 Running tasks
# ----------------------------------------------------------------------------

def test_scripts_run_in_sorted_order_skipping_hidden_and_non_executable(tmp_path, daemons):
    for name in ("b", "a", "10", "2"):
        add_script(tmp_path, "order", name, f"echo {name} >> \"$OUT\"\n")
    add_script(tmp_path, "order", ".hidden", 'echo hidden >> "$OUT"\n')
    add_script(tmp_path, "order", "README", 'echo readme >> "$OUT"\n', mode=0o644)
    (tmp_path / "scripts.d" / "order" / "subdir").mkdir()
    os.symlink(tmp_path / "scripts.d" / "order" / "a", tmp_path / "scripts.d" / "order" / "c")
    out = tmp_path / "out"
    d = daemons(env={"OUT": str(out)})
    assert d.wait_status(d.submit("order"))["status"] == "complete"
    assert out.read_text().split() == ["10", "2", "a", "b", "a"]


def test_first_failure_fails_the_task_and_runs_no_more(tmp_path, daemons):
    add_script(tmp_path, "fail", "1", "echo one\n")
    add_script(tmp_path, "fail", "2", "echo two; exit 7\n")
    add_script(tmp_path, "fail", "3", "echo three\n")
    d = daemons()
    task = d.wait_status(d.submit("fail"))
    assert task["status"] == "failed" and task["exit_code"] == 7
    assert "two\nexit code: 7\n\n" in task["output"] and "three" not in task["output"]


@pytest.mark.parametrize("payload", [
    "$(touch pwned)", "`touch pwned`", "; touch pwned", "' ; touch pwned; '",
    '" && touch pwned "', "a\ntouch pwned", "| touch pwned", "$HOME",
])
def test_params_reach_scripts_as_literal_text(shared_daemon, payload):
    out = add_script(shared_daemon.root, "echo", "run", 'printf "%s" "$2" > out\n').parent / "out"
    task = shared_daemon.wait_status(shared_daemon.submit("echo", p=payload))
    assert task["status"] == "complete" and out.read_text() == "--p=" + payload
    assert not list(shared_daemon.root.rglob("pwned"))


def test_environment_working_directory_and_no_secrets(tmp_path, daemons):
    add_script(tmp_path, "env", "run", 'pwd; echo "$TASKTRAIN_TASK_ID $TASKTRAIN_TASK_NAME"; '
                                       'echo "token=${TASKTRAIN_TOKEN-unset} '
                                       'secret=${TASKTRAIN_SECRET-unset} keep=$KEEP_ME '
                                       'status=${TASKTRAIN_STATUS-unset}"\n')
    d = daemons(env={"TASKTRAIN_TOKEN": "tok", "TASKTRAIN_SECRET": "sec", "KEEP_ME": "yes",
                     "TASKTRAIN_STATUS": "complete"})  # only an .on-finish is told one
    task_id = d.submit("env", headers={"Authorization": "Bearer tok"})
    task = d.get(f"/tasks/{task_id}?format=json", headers={"Authorization": "Bearer tok"})
    wait_for(lambda: d.get(f"/tasks/{task_id}/log", headers={"Authorization": "Bearer tok"})
             .text.endswith("exit code: 0\n\n"))
    output = d.get(f"/tasks/{task_id}/log", headers={"Authorization": "Bearer tok"}).text
    assert f"{tmp_path}/scripts.d/env\n{task_id} env\n" in output
    assert "token=unset secret=unset keep=yes status=unset" in output
    assert task.status == 200


@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda pid: ())(0)) < 2,
                    reason="needs Linux and two CPUs: handlers are kept on one of them")
def test_scripts_may_use_every_cpu_while_handlers_keep_to_one(tmp_path, daemons):
    add_script(tmp_path, "cpus", "run", "grep Cpus_allowed_list /proc/self/status\n")
    d = daemons()
    task = d.wait_status(d.submit("cpus"))
    with open("/proc/self/status") as f:
        mine = next(line for line in f if line.startswith("Cpus_allowed_list"))
    assert mine in task["output"]
    others = []
    for tid in os.listdir(f"/proc/{d.proc.pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a handler whose connection closed
            others.append(os.sched_getaffinity(int(tid)) if int(tid) != d.proc.pid else None)
    assert os.sched_getaffinity(0) in others  # the runner's, which its scripts inherit
    assert len(os.sched_getaffinity(d.proc.pid)) == 1  # the main thread starts the handlers


def test_body_is_fed_to_every_script_on_stdin(tmp_path, daemons):
    add_script(tmp_path, "stdin", "1", "cat\n")
    add_script(tmp_path, "stdin", "2", "cat\n")
    add_script(tmp_path, "plain", "1", "cat; echo end\n")
    d = daemons()
    body = json.dumps({"ref": "refs/heads/main"}).encode()
    task = d.wait_status(d.submit("stdin", body=body,
                                  headers={"Content-Type": "application/json"}))
    assert task["output"].count(body.decode()) == 2
    task = d.wait_status(d.submit("plain"))
    assert "\nend\n" in task["output"]


def test_a_body_is_kept_until_its_task_has_ended(tmp_path, daemons):
    add_script(tmp_path, "block", "run", UNTIL_GO)
    add_script(tmp_path, "stdin", "run", "cat\n")
    d = daemons()
    d.submit("block")
    ran, cancelled = (d.submit("stdin", body=b"payload %d" % i,
                               headers={"Content-Type": "text/plain"}) for i in range(2))
    assert d.request("DELETE", f"/tasks/{cancelled}").status == 200
    (tmp_path / "go").touch()
    assert "payload 0" in d.wait_status(ran)["output"]
    with contextlib.closing(sqlite3.connect(f"file:{d.state}/tasks.sqlite3?mode=ro",
                                            uri=True)) as db:
        assert db.execute("SELECT sum(length(body)) FROM tasks").fetchone() == (0,)


def test_tasks_run_one_at_a_time_in_submission_order(tmp_path, daemons):
    add_script(tmp_path, "seq", "run",
               'echo "start $2" >> "$OUT"; sleep 0.05; echo "end $2" >> "$OUT"\n')
    add_script(tmp_path, "other", "run", 'echo "start $2" >> "$OUT"; echo "end $2" >> "$OUT"\n')
    out = tmp_path / "out"
    d = daemons(env={"OUT": str(out)})
    ids = [d.submit("seq" if i % 2 else "other", i=str(i)) for i in range(6)]
    d.wait_status(ids[-1])
    expected = []
    for i in range(6):
        expected += [f"start --i={i}", f"end --i={i}"]
    assert out.read_text().splitlines() == expected


def test_a_submission_that_wakes_the_idle_runner_is_answered_as_its_script_starts(
        tmp_path, daemons):
    add_script(tmp_path, "deploy", "run", "exec sleep 30\n")
    folder = tmp_path / "scripts.d" / "deploy"
    for i in range(3000):  # listing them keeps the runner busy for some milliseconds
        (folder / f"notes-{i}.txt").touch()
    d = daemons()
    task_id = d.submit("deploy")
    # The log's command line is written just before the script starts.
    assert d.log(task_id).startswith(f"{d.scripts}/deploy/run --name=deploy\n")
    assert d.request("DELETE", f"/tasks/{task_id}").status == 200


def copy_as_a_crash_leaves_it(state_dir, to):
    """The task database and its WAL as they are now, copied as a crash leaves them."""
    to.mkdir()
    for name in ("tasks.sqlite3", "tasks.sqlite3-wal"):
        (to / name).write_bytes((state_dir / name).read_bytes())
    return to


def test_the_wal_is_written_ahead_and_a_crashed_stores_frames_are_read_past_it(tmp_path):
    old = tmp_path / "old"  # a WAL shorter than the zeros, as an older version leaves it
    old.mkdir()
    db = sqlite3.connect(old / "tasks.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(tasktrain.SCHEMA)
    db.execute("INSERT INTO tasks (id, name, params, body, fingerprint, status, created_us) "
               "VALUES ('6b1a00000000a', 'example', '{}', x'', 'f', 'pending', 0)")
    state = copy_as_a_crash_leaves_it(old, tmp_path / "state")
    db.close()
    wal = state / "tasks.sqlite3-wal"
    assert 0 < wal.stat().st_size < tasktrain.WAL_ZEROED_BYTES
    store = tasktrain.TaskStore(str(state))
    try:
        assert wal.stat().st_size >= tasktrain.WAL_ZEROED_BYTES  # no sync grows it
        assert store.status("6b1a00000000a") == "pending"
        for i in range(50):
            store.submit("example", {"i": str(i)}).synced()
        assert wal.stat().st_size == tasktrain.WAL_ZEROED_BYTES
        crashed = copy_as_a_crash_leaves_it(state, tmp_path / "crashed")  # frames, then zeros
    finally:
        store.close()
    store = tasktrain.TaskStore(str(crashed))
    assert store.pending_count() == 51
    store.close()


def test_a_wait_for_a_tasks_start_ends_as_its_first_script_starts(tmp_path):
    add_script(tmp_path, "example", "run", "exec sleep 30\n")
    store, runner = start_runner(tmp_path)
    try:
        submitted = store.submit("example", {}, on_claimed=runner.hand_over)
        assert submitted.handed_to_runner == submitted.task.id
        submitted.synced()
        started = time.monotonic()
        runner.wait_started(submitted.task.id, DEADLINE_S)
        assert time.monotonic() - started < DEADLINE_S / 2
        log = (tmp_path / "state" / "logs" / f"{submitted.task.id}.log").read_text()
        assert log == "scripts.d/example/run --name=example\n"
    finally:
        runner.shutdown("stopped by the test")
        store.close()


def test_missing_folder_when_the_task_starts_fails_with_exit_2(tmp_path, daemons):
    add_script(tmp_path, "block", "run", UNTIL_GO)
    script = add_script(tmp_path, "doomed", "run", "exit 0\n")
    d = daemons()
    d.submit("block")
    doomed = d.submit("doomed")
    script.unlink()
    script.parent.rmdir()
    (tmp_path / "go").touch()
    task = d.wait_status(doomed)
    assert task["status"] == "failed" and task["exit_code"] == 2
    assert task["output"] == "Missing scripts for this task name.\n"


def submit_until_refused(d, name):
    """Submit tasks `name` (with i=0, 1, ...) until one is refused; returns the ids
    accepted and the refusal."""
    accepted = []
    for i in range(1000):
        resp = d.request("POST", f"/task?name={name}&i={i}")
        if resp.status != 201:
            return accepted, resp
        accepted.append(record_fields(resp.text)["ID"])
    raise AssertionError("no submission was refused")


NEEDS_PRLIMIT = pytest.mark.skipif(not hasattr(resource, "prlimit"),
                                   reason="needs Linux's prlimit")
# Files may not grow past 96 KiB, as on a full disk (SIGXFSZ ignored: the write fails).
FULL_DISK = ("import os, resource, signal, sys\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, resource.RLIM_INFINITY))\n"
             "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")


@NEEDS_PRLIMIT
def test_a_full_disk_is_a_503_and_the_queue_goes_on_in_order_once_there_is_room(tmp_path,
                                                                                 daemons):
    add_script(tmp_path, "quick", "run", 'echo "$2" >> "$GO.ran"\n')
    d = daemons(wrapper=FULL_DISK)
    accepted, resp = submit_until_refused(d, "quick")
    assert resp.status == 503 and resp.headers["Retry-After"]
    assert "task store cannot be written" in resp.text and resp.text.count("\n") == 1
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    accepted.append(d.submit("quick", i="late"))
    for task_id in accepted:
        assert d.wait_status(task_id)["status"] == "complete"
    ran = (tmp_path / "go.ran").read_text().split()
    assert ran == [f"--i={i}" for i in range(len(accepted) - 1)] + ["--i=late"]


@NEEDS_PRLIMIT
def test_a_task_whose_log_has_no_room_waits_at_the_head_of_the_queue(tmp_path, daemons):
    """Never lose work: a store that still takes commits (its write-ahead log is
    written ahead) beside logs that do not fit must not fail the queue."""
    add_script(tmp_path, "gate", "run", UNTIL_GO)
    add_script(tmp_path, "quick", "run", 'echo "$2" >> "$GO.ran"\n')
    d = daemons(wrapper=FULL_DISK)
    gate = d.submit("gate")
    first = d.submit("quick", i="first")
    (d.state / "logs" / f"{first}.log").write_bytes(b"." * 100_000)  # past the 96 KiB
    (tmp_path / "go").touch()
    wait_for(lambda: f"task {first}: no room for its log" in d.stderr())
    # Put back, it is pending but for the moment of each new try.
    wait_for(lambda: (d.task(first)["status"], d.task(first).get("position")) == ("pending", 1))
    second = d.submit("quick", i="second")
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    assert d.wait_status(second)["status"] == "complete"
    assert d.task(first)["status"] == "complete" and d.task(gate)["status"] == "complete"
    assert (tmp_path / "go.ran").read_text().split() == ["--i=first", "--i=second"]
    assert d.stderr().count("no room for its log") == 1  # not once a second


@NEEDS_PRLIMIT
def test_a_stop_while_a_tasks_end_cannot_be_written_fails_it_at_the_next_start(tmp_path,
                                                                             daemons):
    add_script(tmp_path, "gate", "run", UNTIL_GO + 'echo gate >> "$GO.ran"\n')
    add_script(tmp_path, "quick", "run", 'echo "$2" >> "$GO.ran"\n')
    d = daemons(wrapper=FULL_DISK)
    gate = d.submit("gate")
    queued, _ = submit_until_refused(d, "quick")
    (tmp_path / "go").touch()  # the tasks run until one's end no longer fits
    stuck = wait_for(lambda: re.search(r"task (\w+): cannot record that it ended",
                                       d.stderr()))[1]
    assert d.signal(signal.SIGTERM) == 0
    d = daemons()
    assert d.task(stuck)["status"] == "failed"  # it ran: failed, as after a crash
    for task_id in {gate, *queued} - {stuck}:
        assert d.wait_status(task_id)["status"] == "complete"
    assert (tmp_path / "go.ran").read_text().split() == ["gate"] + [
        f"--i={i}" for i in range(len(queued))]  # each once, in order


def test_a_removed_logs_folder_is_made_again_and_tasks_still_run(tmp_path, daemons):
    add_script(tmp_path, "hello", "run", "echo hello\n")
    d = daemons()
    (d.state / "logs").rmdir()
    task = d.wait_status(d.submit("hello"))
    assert task["status"] == "complete" and "\nhello\n" in task["output"]


def test_a_script_whose_name_is_not_utf8_runs_and_shows_as_u_fffd(tmp_path, daemons):
    add_script(tmp_path, "odd", "run", "echo ran\n")
    try:
        folder = os.fsencode(tmp_path / "scripts.d" / "odd")
        os.rename(folder + b"/run", folder + b"/r\xffn")
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    d = daemons()
    task = d.wait_status(d.submit("odd"))
    assert task["status"] == "complete"
    assert task["output"].startswith(f"'{d.scripts}/odd/r\ufffdn' --name=odd\nran\n")
    assert task["scripts"][0]["path"] == f"{d.scripts}/odd/r\ufffdn"
    for accept in ("text/plain", "text/html"):
        assert d.get(f"/tasks/{task['id']}", headers={"Accept": accept}).status == 200


def test_output_reaches_disk_as_it_comes(tmp_path, daemons):
    add_script(tmp_path, "talk", "run", "echo early\n" + UNTIL_GO)
    d = daemons()
    task_id = d.submit("talk")
    wait_for(lambda: "early\n" in record_fields(d.get(f"/tasks/{task_id}").text)["RESULTS"])
    assert d.task(task_id)["status"] == "running"
    (tmp_path / "go").touch()


def test_kill_9_loses_no_task_and_never_reruns_the_running_one(tmp_path, daemons):
    add_script(tmp_path, "slow", "run", 'echo ran >> "$RUNS"\nsleep 300\n')
    add_script(tmp_path, "quick", "run", 'echo "$2" >> "$OUT"\n')
    env = {"OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs")}
    d = daemons(env=env)
    slow = d.submit("slow")
    queued = [d.submit("quick", n=str(i)) for i in range(5)]
    wait_for(lambda: (tmp_path / "runs").exists())
    d.proc.kill()
    d.proc.wait()
    d = daemons(env=env)
    for task_id in queued:
        d.wait_status(task_id)
    task = d.task(slow)
    assert task["status"] == "failed"
    assert "stopped while this task was running" in task["output"]
    assert (tmp_path / "out").read_text().split() == [f"--n={i}" for i in range(5)]
    assert (tmp_path / "runs").read_text() == "ran\n"


def kill_while_running(d, tmp_path, running, queued):
    """kill -9 the daemon while task `running` runs a script (or its .on-finish) that
    wrote its pid, its group's number, to $GO.pid, and task `queued` waits; returns
    the ids of both and that pid."""
    running_id = d.submit(running)
    queued_id = d.submit(queued)
    wait_for(lambda: (tmp_path / "go.pid").exists() and (tmp_path / "go.pid").read_text())
    pid = int((tmp_path / "go.pid").read_text())
    with contextlib.closing(sqlite3.connect(f"file:{d.state}/tasks.sqlite3?mode=ro",
                                            uri=True)) as db:
        # The daemon notes the script's process group just after starting it; a daemon
        # killed before that cannot know the group (the README says so).
        wait_for(lambda: db.execute("SELECT pgid FROM tasks WHERE id = ?",
                                    (running_id,)).fetchone()[0] == pid)
    d.proc.kill()
    d.proc.wait()
    return running_id, queued_id, pid


def add_state_probe(tmp_path, task, pid_file):
    """Task `task` writes to $GO.out the state of the process whose pid is in
    $GO.<pid_file> as it runs (`gone`, or /proc's: Z a zombie, S asleep...)."""
    add_script(tmp_path, task, "run",
               f'state=$(awk \'{{print $3}}\' /proc/$(cat "$GO.{pid_file}")/stat 2>/dev/null)\n'
               'echo "${state:-gone}" > "$GO.out"\n')


def test_restart_stops_scripts_a_killed_daemon_left_running(tmp_path, daemons):
    add_script(tmp_path, "slow", "run", 'echo $$ > "$GO.pid"\nexec sleep 300\n')
    add_state_probe(tmp_path, "next", "pid")
    _, queued, orphan = kill_while_running(daemons(), tmp_path, "slow", "next")
    assert not gone(orphan)
    d = daemons()
    d.wait_status(queued)
    assert (tmp_path / "go.out").read_text().strip() in ("gone", "Z")  # before it ran
    assert "left running by a daemon that died" in d.stderr()


def test_restart_stops_what_an_earlier_script_of_the_crashed_task_left_running(tmp_path,
                                                                               daemons):
    add_script(tmp_path, "slow", "10-leave", 'sleep 300 & echo $! > "$GO.left"\n')
    add_script(tmp_path, "slow", "20-run", 'echo $$ > "$GO.pid"\nexec sleep 300\n')
    add_state_probe(tmp_path, "next", "left")
    _, queued, running = kill_while_running(daemons(), tmp_path, "slow", "next")
    left = int((tmp_path / "go.left").read_text())
    assert not gone(left) and not gone(running)
    d = daemons()
    d.wait_status(queued)
    assert (tmp_path / "go.out").read_text().strip() in ("gone", "Z")  # before it ran
    assert gone(running)
    assert d.stderr().count("left running by a daemon that died") == 2


def test_restart_stops_an_on_finish_a_killed_daemon_left_running(tmp_path, daemons):
    """SPEC 8: .on-finish runs before the next task starts, after a crash too."""
    add_script(tmp_path, "slow", "run", "exit 0\n")
    add_script(tmp_path, "slow", ".on-finish", 'echo $$ > "$GO.pid"\nexec sleep 300\n')
    add_state_probe(tmp_path, "next", "pid")
    running_id, queued, orphan = kill_while_running(daemons(), tmp_path, "slow", "next")
    assert not gone(orphan)
    d = daemons()
    d.wait_status(queued)
    assert (tmp_path / "go.out").read_text().strip() in ("gone", "Z")  # before it ran
    # Its scripts had ended: the crash in its .on-finish does not change how (SPEC 8).
    task = d.task(running_id)
    assert (task["status"], task["exit_code"]) == ("complete", 0)
    assert [r["exit_code"] for r in task["scripts"]] == [0]
    assert d.log(running_id).endswith(
        tasktrain.RESTARTED_AFTER_SCRIPTS.format("complete") + "\n")


def test_after_a_crash_the_failed_tasks_on_finish_runs_before_the_next_task(tmp_path,
                                                                            daemons):
    """SPEC 8: .on-finish runs after every task that was started, whatever its end."""
    add_script(tmp_path, "slow", "run", 'echo $$ > "$GO.pid"\nexec sleep 300\n')
    add_script(tmp_path, "slow", ".on-finish",
               'echo "$TASKTRAIN_STATUS:$TASKTRAIN_EXIT_CODE:$(cat)" >> "$GO.fin"\n')
    add_script(tmp_path, "next", "run", 'cp "$GO.fin" "$GO.seen"\n')
    d = daemons()
    resp = d.request("POST", "/task?name=slow", body=b"payload")
    slow, queued = record_fields(resp.text)["ID"], d.submit("next")
    wait_for(lambda: (tmp_path / "go.pid").exists() and (tmp_path / "go.pid").read_text())
    d.proc.kill()
    d.proc.wait()
    d = daemons()
    assert d.wait_status(queued)["status"] == "complete"
    assert (tmp_path / "go.seen").read_text() == "failed::payload\n"  # before the next task
    assert d.log(slow).count("on-finish (task failed, exit code none): ") == 1


def test_a_crashed_tasks_on_finish_is_owed_until_a_start_has_run_it(tmp_path, daemons):
    """A second crash, while the restarted daemon still stops what the first left
    running, must not lose the .on-finish it owes."""
    add_script(tmp_path, "stubborn", "run", 'trap "" TERM\necho $$ > "$GO.pid"\nexec sleep 300\n')
    add_script(tmp_path, "stubborn", ".on-finish", 'echo "$TASKTRAIN_STATUS" >> "$GO.fin"\n')
    add_script(tmp_path, "next", "run", "exit 0\n")
    _, queued, orphan = kill_while_running(daemons(), tmp_path, "stubborn", "next")
    d = daemons("--grace", "300")
    wait_for(lambda: "left running by a daemon that died" in d.stderr())
    d.proc.kill()  # while it waits for the stubborn script: no .on-finish has run yet
    d.proc.wait()
    assert not (tmp_path / "go.fin").exists() and not gone(orphan)
    d = daemons("--grace", "0.2")
    assert d.wait_status(queued)["status"] == "complete"
    assert (tmp_path / "go.fin").read_text() == "failed\n"
    assert gone(orphan)  # the third start stopped it too, before the .on-finish ran


@pytest.mark.parametrize("script, status, code", [
    ("exit 0", "complete", 0), ("exit 3", "failed", 3)])
def test_a_crash_while_what_a_tasks_scripts_left_is_stopped_keeps_how_they_ended(
        tmp_path, daemons, script, status, code):
    """SPEC 8: nothing after the scripts changes the task's status, a crash neither;
    the .on-finish the restart runs is told that status."""
    add_script(tmp_path, "leaves", "run",
               f"""sh -c 'trap "" TERM; echo $$ > "$GO.pid"; exec sleep 300' &\n"""
               f'while [ ! -s "$GO.pid" ]; do sleep 0.01; done\n{script}\n')
    add_script(tmp_path, "leaves", ".on-finish",
               'echo "$TASKTRAIN_STATUS:$TASKTRAIN_EXIT_CODE" >> "$GO.fin"\n')
    d = daemons("--grace", "300")
    task_id = d.submit("leaves")
    try:
        wait_for(lambda: d.task(task_id)["scripts"])  # how its scripts ended, saved
        assert d.task(task_id)["exit_code"] is None  # null until the end is recorded
        d.proc.kill()  # while the daemon waits for the child that ignores SIGTERM
        d.proc.wait()
        d = daemons("--grace", "0.2")
        task = d.wait_status(task_id)
        assert (task["status"], task["exit_code"]) == (status, code)
        assert [run["exit_code"] for run in task["scripts"]] == [code]
        assert tasktrain.RESTARTED_AFTER_SCRIPTS.format(status) in task["output"]
        fin = tmp_path / "go.fin"  # created by the shell before its echo writes to it
        wait_for(lambda: fin.exists() and fin.read_text().endswith("\n"))
        assert fin.read_text() == f"{status}:{code}\n"
        wait_for(lambda: gone(int((tmp_path / "go.pid").read_text())))
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((tmp_path / "go.pid").read_text()), signal.SIGKILL)


def crashed_store(tmp_path, keep=tasktrain.DEFAULT_KEEP):
    """A store reopened after its daemon died with a task running; returns (store, task)."""
    store = tasktrain.TaskStore(str(tmp_path), keep)
    task = store.submit("crashed", {}).task
    store.start_claiming().synced()
    tasktrain.append_log_line(store.log_path(task.id), "run --name=crashed")  # it started
    store.close()  # no end written: as a kill -9 leaves it
    return tasktrain.TaskStore(str(tmp_path), keep), task


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux tells a group's task")
def test_a_restart_leaves_alone_a_group_whose_number_another_process_took(tmp_path, daemons):
    add_script(tmp_path, "next", "run", "exit 0\n")
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        store, crashed = crashed_store(tmp_path / "state")
        store.close()
        with contextlib.closing(sqlite3.connect(tmp_path / "state" / "tasks.sqlite3")) as db:
            # As if its group had ended since, and its number gone to the stranger.
            db.execute("UPDATE tasks SET pgid = ? WHERE id = ?", (stranger.pid, crashed.id))
            db.commit()
        d = daemons()
        assert d.wait_status(d.submit("next"))["status"] == "complete"
        assert stranger.poll() is None  # not signalled
        assert "left running by a daemon that died" not in d.stderr()
    finally:
        stranger.kill()
        stranger.wait()


def test_a_restart_knows_a_group_by_its_leader_when_its_environment_is_gone(tmp_path,
                                                                            daemons):
    add_script(tmp_path, "bare", "run", 'echo $$ > "$GO.pid"\nexec env -i sleep 300\n')
    add_script(tmp_path, "next", "run", "exit 0\n")
    _, queued, orphan = kill_while_running(daemons(), tmp_path, "bare", "next")
    d = daemons("--grace", "0.2")
    assert d.wait_status(queued)["status"] == "complete"
    assert gone(orphan)  # its environment names no task, but its leader is the one recorded


def test_a_task_whose_on_finish_is_owed_is_not_pruned_before_it_has_run(tmp_path):
    store, crashed = crashed_store(tmp_path, keep=0)
    try:
        assert [t.id for t in store.on_finish_owed_tasks()] == [crashed.id]
        other = store.submit("other", {}).task
        store.cancel_pending(other.id)  # an end, and with --keep 0 a prune
        assert [t.id for t in store.on_finish_owed_tasks()] == [crashed.id]
        store.on_finish_done(crashed.id)
        store.cancel_pending(store.submit("more", {}).task.id)
        assert store.get(crashed.id) is None  # pruned once it is no longer owed
    finally:
        store.close()


def test_a_stop_during_recovery_leaves_the_on_finish_owed(tmp_path):
    add_script(tmp_path, "crashed", ".on-finish", 'echo ran >> "$0.ran"\n')
    store, crashed = crashed_store(tmp_path / "state")
    runner = tasktrain.Runner(store, str(tmp_path / "scripts.d"), "scripts.d")
    try:
        runner._shutting_down.set()  # as a SIGTERM during _stop_orphans leaves it
        runner._finish_crashed()
        assert [t.id for t in store.on_finish_owed_tasks()] == [crashed.id]
        assert not (tmp_path / "scripts.d" / "crashed" / ".on-finish.ran").exists()
        with open(store.log_path(crashed.id)) as log:
            assert "on-finish" not in log.read()  # nor its line: the next start runs it
    finally:
        store.close()


def test_a_crash_during_on_finish_does_not_run_it_again(tmp_path, daemons):
    add_script(tmp_path, "slow", "run", "exit 0\n")
    add_script(tmp_path, "slow", ".on-finish", 'echo $$ >> "$GO.fin"\n'
               '[ -e "$GO.once" ] && exit 0\ntouch "$GO.once"\nexec sleep 300\n')
    d = daemons()
    slow = d.submit("slow")
    fin = tmp_path / "go.fin"
    wait_for(lambda: fin.exists() and fin.read_text())
    with contextlib.closing(sqlite3.connect(f"file:{d.state}/tasks.sqlite3?mode=ro",
                                            uri=True)) as db:  # so that a restart stops it
        wait_for(lambda: db.execute("SELECT pgid FROM tasks WHERE id = ?",
                                    (slow,)).fetchone()[0] == int(fin.read_text()))
    d.proc.kill()
    d.proc.wait()
    d = daemons()
    assert d.wait_status(d.submit("slow"))["status"] == "complete"
    assert d.task(slow)["status"] == "complete"  # as its scripts ended
    assert len(fin.read_text().split()) == 2  # the crashed task's, and the new one's


def test_nothing_is_claimed_before_a_dead_daemons_scripts_are_stopped(tmp_path, daemons):
    add_script(tmp_path, "stubborn", "run", 'trap "" TERM\necho $$ > "$GO.pid"\nexec sleep 300\n')
    add_script(tmp_path, "next", "run", "exit 0\n")
    _, queued, orphan = kill_while_running(daemons(), tmp_path, "stubborn", "next")
    d = daemons("--grace", "1")
    # Claimed now, it would be failed, never run, if this daemon died during the grace.
    assert d.task(queued)["status"] == "pending" and not gone(orphan)
    assert d.wait_status(queued)["status"] == "complete" and gone(orphan)


def test_keep_prunes_oldest_finished_tasks_and_logs_never_pending(tmp_path, daemons):
    add_script(tmp_path, "example", "run", "echo hi\n")
    add_script(tmp_path, "block", "run", UNTIL_GO)
    d = daemons("--keep", "2")
    done = [d.submit("example", i=str(i)) for i in range(4)]
    d.wait_status(done[-1])
    blocker = d.submit("block")
    waiting = [d.submit("example", w=str(i)) for i in range(3)]
    kept = [t["id"] for t in d.get("/tasks?format=json").json()]
    assert kept == waiting[::-1] + [blocker] + done[:1:-1]
    assert d.get(f"/tasks/{done[0]}").status == 404
    assert sorted(os.listdir(tmp_path / "state" / "logs")) == sorted(
        f"{i}.log" for i in done[2:] + [blocker])  # pending tasks get a log when they start
    (tmp_path / "go").touch()
    d.wait_status(waiting[-1])


# ----------------------------------------------------------------------------
# §5 The web page
# ----------------------------------------------------------------------------

XSS = '<script>alert("x")</script>'


LIST_DIV = r'<div class="(\w+)">\n(<p>.*?</p>)\n<p>.*?</p>\n</div>'


def list_rows(page):
    """The list page's tasks as (status class, [field's HTML without its label, ...])."""
    return [(status, re.findall(r"<span[^>]*>(?:[A-Z][A-Za-z ]+: )?(.*?)</span>", div))
            for status, div in re.findall(r'<div class="(?!tasks")(\w+)">(.*?)</div>', page, re.S)]


def test_list_page_keeps_the_original_shape(tmp_path, daemons):
    add_script(tmp_path, "example", "args.sh", ARGS_SCRIPT)
    add_script(tmp_path, "block", "run", UNTIL_GO)
    d = daemons("--grace", "1")
    done = d.submit("example", evil=XSS, path="a/b")
    d.wait_status(done)
    running, pending = d.submit("block"), d.submit("example")
    d.wait_status(running, "running")
    page = d.get("/tasks")
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<title>Task Train</title>" in page.text and "<p>1 pending task(s).</p>" in page.text
    divs = re.findall(LIST_DIV, page.text, re.S)
    assert [status for status, _ in divs] == ["pending", "running", "complete"]
    assert len(re.findall(r'<div class="(?!tasks")', page.text)) == 3  # one per task
    for task_id, (status, fields) in zip([pending, running, done], divs):
        text = html.unescape(re.sub(r"<[^>]+>", "", fields.replace("<br />", "")))
        labels = re.findall(r"^(\w+): (.*)$", text, re.M)
        assert [label for label, _ in labels] == ["ID", "Name", "Params", "Status", "Date"]
        assert labels[0][1] == task_id and labels[3][1] == status
        assert f'<p><span>ID: <a href="tasks/{task_id}">{task_id}</a></span><br />' in fields
    done_fields = divs[2][1]
    assert "Name: example</span><br />" in done_fields
    # What the text record's PARAMS line says, PHP's JSON, is the shown params' tooltip.
    record_params = re.search(r"^PARAMS:  (.*)$", d.get(f"/tasks/{done}").text, re.M).group(1)
    assert record_params.startswith('{"evil":"<script>') and '"a\\/b"' in record_params
    tooltip = re.search(r'<span title="([^"]*)">Params: ([^<]*)</span>', done_fields)
    assert html.unescape(tooltip.group(1)) == record_params
    assert html.unescape(tooltip.group(2)) == f"evil='{XSS}' path=a/b"
    assert XSS not in page.text and "&lt;script&gt;" in page.text


def browser_delete(d, page_path, url):
    """DELETE `url` as the page at `page_path` sends it: a same-origin fetch."""
    return d.request("DELETE", urllib.parse.urljoin(page_path, url), headers={
        "Origin": f"http://127.0.0.1:{d.port}", "Sec-Fetch-Site": "same-origin",
        "Sec-Fetch-Mode": "cors", "Accept": "application/json"})


def test_list_page_shows_each_task_at_a_glance(tmp_path, daemons):
    add_script(tmp_path, "example", "args.sh", ARGS_SCRIPT)
    add_script(tmp_path, "fails", "run", "exit 3\n")
    add_script(tmp_path, "block", "run", UNTIL_GO)
    d = daemons("--grace", "1")
    complete = d.submit("example", branch="main", msg="two words")
    failed = d.submit("fails")
    d.wait_status(failed)
    running = d.submit("block")
    pending, cancelled = d.submit("example", wait="1"), d.submit("example", wait="2")
    d.request("DELETE", f"/tasks/{cancelled}")
    d.wait_status(running, "running")
    page = d.get("/tasks").text
    assert "<title>Task Train</title>" in page and "<h1>Task Train</h1>" in page
    assert "<p>1 pending task(s).</p>" in page and 'http-equiv="refresh"' in page
    rows = list_rows(page)
    assert [status for status, _ in rows] == [
        "cancelled", "pending", "running", "failed", "complete"]
    by_id = {re.search(r'href="tasks/(\w+)"', cells[0]).group(1): cells for _, cells in rows}
    assert list(by_id) == [cancelled, pending, running, failed, complete]
    assert by_id[complete][:4] == [f'<a href="tasks/{complete}">{complete}</a>', "example",
                                   "branch=main msg=&#x27;two words&#x27;", "complete"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells[4]) for cells in by_id.values())
    assert re.fullmatch(r"\d+ ms", by_id[complete][5]) and by_id[complete][6] == "0"
    assert by_id[failed][6] == "3" and by_id[cancelled][5:7] == ["never ran", ""]
    assert by_id[running][5].startswith("running for ") and by_id[pending][5] == "next to run"
    with_button = [task_id for task_id, cells in by_id.items() if "<button" in cells[7]]
    assert with_button == [pending, running]
    # Each status has a colour of its own, the original's for three of them.
    css = dict(re.findall(r"\.(pending|running|complete|failed|cancelled) \{ ([^}]*) \}", page))
    assert len(set(css.values())) == 5 and css["complete"] == "color: gray;"
    assert css["running"] == "background: yellow;" and css["failed"] == "color: #8B0000;"
    # The Cancel button's DELETE, as a browser sends it from this page.
    button_url = re.search(r'data-cancel="([^"]+)"', by_id[running][7]).group(1)
    answer = browser_delete(d, "/tasks", button_url)
    assert answer.status == 200 and answer.json()["status"] == "cancelled"


def test_list_page_refreshes_while_work_is_left(tmp_path, daemons):
    add_script(tmp_path, "block", "run", UNTIL_GO)
    d = daemons()
    first = d.submit("block")
    d.submit("block", again="1")
    d.wait_status(first, "running")
    page = d.get("/tasks").text
    assert 'http-equiv="refresh"' in page and "<p>1 pending task(s).</p>" in page
    assert [status for status, _ in list_rows(page)] == ["pending", "running"]
    (tmp_path / "go").touch()
    wait_for(lambda: 'http-equiv="refresh"' not in d.get("/tasks").text)


@pytest.fixture(scope="module")
def kept_101(tmp_path_factory):
    """A daemon keeping 101 finished tasks; yields it and their ids, newest first."""
    root = tmp_path_factory.mktemp("kept")
    store = tasktrain.TaskStore(str(root / "state"))
    ids = [store.submit("gone", {"i": str(i)}).task.id for i in range(101)]
    store.close()
    d = Daemon(root)  # "gone" has no scripts: each task fails as it starts
    wait_for(lambda: d.task(ids[-1])["status"] == "failed")
    yield d, ids[::-1]
    d.stop()


LISTED = {  # how each format lists its tasks' ids, and its link to the older ones
    "json": (lambda resp: [t["id"] for t in resp.json()],
             lambda resp: resp.headers.get("Link")),
    "text": (lambda resp: re.findall(r"^ID:      (\w+)$", resp.text, re.M),
             lambda resp: resp.headers.get("Link")),
    "html": (lambda resp: re.findall(r'<div class="\w+">\n<p><span>ID: <a href="tasks/(\w+)">',
                                     resp.text),
             lambda resp: (lambda m: m and f'<{html.unescape(m.group(1))}>; rel="next"')(
                 re.search(r'<a href="([^"]+)">Older tasks</a>', resp.text))),
}


@pytest.mark.parametrize("fmt", LISTED)
def test_list_shows_the_newest_100_and_links_to_older_ones(kept_101, fmt):
    d, ids = kept_101
    listed, older_link = LISTED[fmt]
    first = d.get(f"/tasks?format={fmt}")
    assert listed(first) == ids[:100]
    assert older_link(first) == f'<tasks?before={ids[99]}&format={fmt}>; rel="next"'
    assert first.headers.get("Link") == older_link(first)
    older = d.get("/" + older_link(first)[1:].split(">")[0])  # relative to /tasks
    assert listed(older) == ids[100:] and older_link(older) is None
    exactly_100 = d.get(f"/tasks?before={ids[0]}&format={fmt}")
    assert listed(exactly_100) == ids[1:] and older_link(exactly_100) is None
    before_the_oldest = d.get(f"/tasks?before={ids[-1]}&format={fmt}")
    assert before_the_oldest.status == 200 and listed(before_the_oldest) == []
    assert older_link(before_the_oldest) is None


@pytest.mark.parametrize("limit, shown, more", [(1, 1, True), (100, 100, True),
                                                (101, 101, False), (1000, 101, False)])
def test_limit_sets_the_page_size_up_to_1000(kept_101, limit, shown, more):
    d, ids = kept_101
    resp = d.get(f"/tasks?format=json&limit={limit}")
    assert [t["id"] for t in resp.json()] == ids[:shown]
    assert resp.headers.get("Link") == (
        f'<tasks?before={ids[shown - 1]}&limit={limit}&format=json>; rel="next"' if more else None)


@pytest.mark.parametrize("query, reason", [
    ("/tasks?limit=0", "Bad limit parameter: give a whole number, from 1 to 1000."),
    ("/tasks?limit=1001", "Bad limit parameter: give a whole number, from 1 to 1000."),
    ("/tasks?limit=-1", "Bad limit parameter: give a whole number, from 1 to 1000."),
    ("/tasks?limit=", "Bad limit parameter: give a whole number, from 1 to 1000."),
    ("/tasks?limit=%EF%BC%91", "Bad limit parameter: give a whole number, from 1 to 1000."),
    ("/tasks?format=text&limit=1e3", "Bad limit parameter: give a whole number, from 1 to 1000."),
    ("/tasks?before=6b1032f83b6f", "Bad before parameter: give a task ID (13 hex digits)."),
    ("/tasks?before=6B1032F83B6F6", "Bad before parameter: give a task ID (13 hex digits)."),
    ("/tasks?before=", "Bad before parameter: give a task ID (13 hex digits)."),
    ("/tasks/{id}/log?from=-1", "Bad from parameter: give a whole number, 0 or more."),
    ("/tasks/{id}/log?follow=1&from=x", "Bad from parameter: give a whole number, 0 or more."),
])
def test_bad_paging_values_are_400_with_one_line(kept_101, query, reason):
    d, ids = kept_101
    resp = d.get(query.format(id=ids[0]))
    assert (resp.status, resp.text) == (400, reason + "\n")


def test_log_from_a_byte_offset_sends_the_rest(kept_101):
    d, ids = kept_101
    whole = d.log(ids[0]).encode()
    assert whole == tasktrain.MISSING_SCRIPTS.encode() + b"\n"
    for start in (0, 8, len(whole), len(whole) + 5):
        assert d.get(f"/tasks/{ids[0]}/log?from={start}").body == whole[start:]
        assert d.get(f"/tasks/{ids[0]}/log?follow=1&from={start}").body == whole[start:]
    for past in ("9" * 19, "9" * 5000):  # beyond any file, and 18 digits: still nothing
        assert d.get(f"/tasks/{ids[0]}/log?from={past}").body == b""
        assert d.get(f"/tasks/{ids[0]}/log?follow=1&from={past}").body == b""


def test_the_live_page_follows_from_where_its_tail_ends(tmp_path, daemons):
    lines = ('i=0; while [ $i -lt 6000 ]; do i=$((i+1)); '
             'echo "line $i: f\u00fcnf, and more text to make it longer"; done\n')
    add_script(tmp_path, "talk", "run", lines + UNTIL_GO + "echo after\nsleep 60\n")
    d = daemons("--grace", "1")
    task_id = d.submit("talk")
    wait_for(lambda: "line 6000" in d.log(task_id))
    log = d.get(f"/tasks/{task_id}/log").body
    assert len(log) > tasktrain.HTML_TAIL_BYTES
    page = d.get(f"/tasks/{task_id}", headers={"Accept": "text/html"}).text
    assert f'This page keeps the last lines; <a href="{task_id}/log">the full log</a>' in page
    # Once the stream ends it reloads when the daemon answers; a proxy's 502 is no answer.
    assert ".then(response => response.status < 500, () => false)" in page
    shown = re.search(r'<div id="output"[^>]*><div>(.*?)</div><div></div></div>', page, re.S)
    shown = html.unescape(shown.group(1)).encode()
    assert shown.startswith(b"line ") and log.endswith(b"\n" + shown)
    assert tasktrain.HTML_TAIL_BYTES - 100 < len(shown) <= tasktrain.HTML_TAIL_BYTES
    follow = html.unescape(re.search(r'data-follow="([^"]+)"', page).group(1))
    assert follow == f"{task_id}/log?follow=1&from={len(log)}"
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=DEADLINE_S)
    conn.request("GET", urllib.parse.urljoin(f"/tasks/{task_id}", follow))
    stream = conn.getresponse()
    (tmp_path / "go").touch()
    wait_for(lambda: "after" in d.log(task_id))
    button = re.search(r'<button type="button" data-cancel="([^"]+)"', page).group(1)
    assert browser_delete(d, f"/tasks/{task_id}", button).json()["status"] == "cancelled"
    assert stream.read() == d.get(f"/tasks/{task_id}/log").body[len(log):]
    conn.close()


def test_a_page_shows_the_end_of_a_line_longer_than_its_tail(tmp_path, daemons):
    add_script(tmp_path, "long", "run", "printf x; i=0; while [ $i -lt 15 ]; do i=$((i+1)); "
               "printf '%s' \"$EACH\"; done; echo\n")
    d = daemons(env={"EACH": "\u00e9" * 10000})  # 300,001 bytes in one line
    task_id = d.submit("long")
    assert d.wait_status(task_id)["status"] == "complete"
    page = d.get(f"/tasks/{task_id}", headers={"Accept": "text/html"}).text
    shown = html.unescape(re.search(r'<div id="output"><div>(.*?)</div>', page, re.S).group(1))
    assert shown.endswith("\u00e9\n" "exit code: 0\n\n") and "\ufffd" not in shown
    assert tasktrain.HTML_TAIL_BYTES - 3 <= len(shown.encode()) <= tasktrain.HTML_TAIL_BYTES
    assert f'Earlier output is in <a href="{task_id}/log">the full log</a>' in page


def test_task_page_shows_each_scripts_exit_code_and_duration(tmp_path, daemons):
    d, task_id, task = two_scripts_the_second_failing(tmp_path, daemons)
    page = d.get(f"/tasks/{task_id}?format=html").text
    fields = dict(re.findall(r"<tr><th>([^<]+)</th><td>(.*?)</td></tr>", page))
    assert fields["Status"] == '<span id="status" class="failed">failed</span>'
    assert fields["Params"] == "k=v" and fields["Exit code"] == "3"
    assert re.fullmatch(r"\d+ ms", fields["Duration"])
    runs = re.findall(r'<tr class="(\w+)"><td>([^<]+)</td><td>(\d+)</td><td>([^<]+)</td></tr>', page)
    assert [(status, path, int(code)) for status, path, code, _ in runs] == [
        ("complete", f"{d.scripts}/two/a", 0), ("failed", f"{d.scripts}/two/b", 3)]
    assert [shown for *_, shown in runs] == [tasktrain.render_duration(s["seconds"])
                                            for s in task["scripts"]]
    assert "<button" not in page and "data-follow" not in page and "<script>" not in page


ESCAPED = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"


def page_task(**fields):
    """A finished task as the store would hand it to the pages."""
    return tasktrain.Task(**{"id": "6b1032f83b6f6", "name": "example", "params_json": "{}",
                             "status": "failed", "created_us": 1_700_000_000_000_000,
                             "started_us": 1_700_000_000_000_000,
                             "finished_us": 1_700_000_001_000_000, "exit_code": 1, **fields})


def superseded(task, by):
    task.superseded_by = by  # the deploy issue's field, as the store will set it
    return task


@pytest.mark.parametrize("render", [
    lambda: tasktrain.render_list_html(
        [page_task(params_json=json.dumps({"k": XSS}))], 0, False, 0, lambda t: None),
    lambda: tasktrain.render_list_html(  # cut, with PHP JSON in the tooltip
        [page_task(params_json=json.dumps({"k": XSS * 20}))], 0, False, 0, lambda t: None),
    lambda: tasktrain.render_list_html(
        [page_task()], 0, False, 0, lambda t: None, older="tasks?format=" + XSS),
    lambda: tasktrain.render_task_html(
        page_task(params_json=json.dumps({"k": XSS})), "scripts.d", b"", 0, 0),
    lambda: tasktrain.render_task_html(
        page_task(scripts_json=json.dumps([{"path": XSS, "exit_code": 1, "seconds": 1}])),
        "scripts.d", b"", 0, 0),
    lambda: tasktrain.render_task_html(page_task(), XSS, b"", 0, 0),
    lambda: tasktrain.render_task_html(page_task(), "scripts.d", XSS.encode(), 0, 0),
    lambda: tasktrain.render_task_html(superseded(page_task(), XSS), "scripts.d", b"", 0, 0),
], ids=["list params", "list params tooltip", "list link", "task params", "script path",
        "scripts folder", "output", "superseded by"])
def test_pages_escape_every_field(render):
    page = render()
    assert XSS not in page and ESCAPED in page


def test_task_page_links_the_task_that_superseded_it():
    page = tasktrain.render_task_html(superseded(page_task(), "6b1032f83b6f7"), "s", b"", 0, 0)
    assert '<th>Superseded by</th><td><a href="6b1032f83b6f7">6b1032f83b6f7</a></td>' in page


def test_browser_gets_a_live_page_and_curl_the_record(tmp_path, daemons):
    add_script(tmp_path, "talk", "run", f"echo '{XSS}'\n" + UNTIL_GO)
    d = daemons()
    task_id = d.submit("talk")
    wait_for(lambda: XSS in d.log(task_id))
    page = d.get(f"/tasks/{task_id}", headers={"Accept": "text/html,application/xhtml+xml,*/*"})
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert XSS not in page.text and "&lt;script&gt;alert" in page.text
    assert f'data-follow="{task_id}/log?follow=1&amp;from=' in page.text
    assert 'href="../tasks"' in page.text
    assert d.get(f"/tasks/{task_id}", headers={"Accept": "*/*"}).text.startswith("ID:      ")
    (tmp_path / "go").touch()
    d.wait_status(task_id)
    assert "follow=1" not in d.get(f"/tasks/{task_id}?format=html").text


# ----------------------------------------------------------------------------
# §6 Security and bad input
# ----------------------------------------------------------------------------

def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def token_daemon(tmp_path_factory):
    """One daemon started with --token s3cret, for the table of Authorization headers."""
    d = Daemon(tmp_path_factory.mktemp("token"), "--token", "s3cret")
    yield d
    d.stop()


@pytest.mark.parametrize("authorization, status", [
    (None, 401), ("Bearer s3cret", 200), ("Bearer wrong", 401), ("bearer s3cret", 200),
    (basic("anyone", "s3cret"), 200), (basic("anyone", "wrong"), 401), ("Basic !!!", 401),
    ("s3cret", 401),
])
def test_token_guards_every_request_but_home(token_daemon, authorization, status):
    d = token_daemon
    headers = {"Authorization": authorization} if authorization else {}
    resp = d.get("/tasks", headers=headers)
    assert resp.status == status
    if status == 401:
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="Task Train"'
    assert d.get("/").status == 200
    assert "s3cret" not in d.stderr()


def test_a_token_and_a_secret_beyond_ascii_are_compared_as_the_bytes_sent(tmp_path, daemons):
    """SPEC 6: Bearer T, Basic with password T, X-Gitlab-Token S, as UTF-8 sends them."""
    add_script(tmp_path, "hook", "run", "exit 0\n")
    token, secret = "t\u00f6k\u20acn", "s\u00ebcret"
    d = daemons("--token", token, "--secret", secret)
    for headers, status in [({"Authorization": b"Bearer " + token.encode()}, 200),
                            ({"Authorization": basic("me", token)}, 200),
                            ({"Authorization": b"Bearer " + token.encode("latin-1", "replace")},
                             401)]:
        assert d.get("/tasks", headers=headers).status == status, headers
    listed = client(d, "list", env={"TASKTRAIN_TOKEN": token})
    assert listed.returncode == 0, listed.stderr
    signed = {"X-Hub-Signature-256": "sha256=" + sign(b"{}", secret), "X-GitHub-Event": "push"}
    for headers in (signed, {"X-Gitlab-Token": secret.encode(), "X-Gitlab-Event": "Push Hook"}):
        resp = d.request("POST", "/task?name=hook", body=b"{}" if "X-GitHub-Event" in headers
                         else b'{"x": 1}', headers=headers)
        assert resp.status == 201, resp.text


def test_a_token_that_is_not_utf8_is_compared_as_its_bytes(tmp_path, daemons):
    d = daemons("--token", os.fsdecode(b"t\xffk"))  # as a shell passes such bytes
    assert d.get("/tasks", headers={"Authorization": b"Bearer t\xffk"}).status == 200
    assert d.get("/tasks", headers={"Authorization": "Bearer t\ufffdk".encode()}).status == 401


def test_token_from_environment_guards_submissions(tmp_path, daemons):
    add_script(tmp_path, "example", "run", "exit 0\n")
    d = daemons(env={"TASKTRAIN_TOKEN": "envtok"})
    assert d.request("POST", "/task?name=example").status == 401
    assert d.request("POST", "/task?name=example",
                     headers={"Authorization": "Bearer envtok"}).status == 201


GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def sign(body, secret="hush"):
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@pytest.fixture(scope="module")
def secret_daemon(tmp_path_factory):
    """One daemon started with --secret hush and a task `hook` that prints its stdin."""
    root = tmp_path_factory.mktemp("secret")
    add_script(root, "hook", "run", "cat\n")
    d = Daemon(root, "--secret", "hush")
    yield d
    d.stop()


@pytest.mark.parametrize("header, value, status", [
    (None, None, 401),
    ("X-Hub-Signature-256", "sha256={signature}", 201),
    ("X-Hub-Signature-256", "sha256={other_secrets}", 401),
    ("X-Hub-Signature-256", "{signature}", 401),
    ("X-Gitea-Signature", "{signature}", 201),
    ("X-Gitea-Signature", "{another_bodys}", 401),
    ("X-Gitlab-Token", "hush", 201),
    ("X-Gitlab-Token", "nope", 401),
])
def test_secret_requires_a_webhook_signature(secret_daemon, header, value, status):
    body = json.dumps({"ref": "refs/heads/main", "case": f"{header}: {value}"}).encode()
    headers = {"Content-Type": "application/json"}
    if header:  # a body of its own, so that no case is the replay of another
        headers[header] = value.format(signature=sign(body), other_secrets=sign(body, "other"),
                                       another_bodys=sign(b"tampered"))
    listed = len(secret_daemon.get("/tasks?format=json").json())
    resp = secret_daemon.request("POST", "/task?name=hook", body=body, headers=headers)
    assert resp.status == status, resp.text
    assert len(secret_daemon.get("/tasks?format=json").json()) == listed + (status == 201)


def test_secrets_never_appear_in_logs_records_or_pages(tmp_path, daemons):
    add_script(tmp_path, "hook", "run", "env\n")
    d = daemons("--token", "tok-XYZ", "--secret", "sec-XYZ")
    auth = {"Authorization": "Bearer tok-XYZ"}
    task_id = d.submit("hook", headers=auth)
    wait_for(lambda: "exit code" in d.get(f"/tasks/{task_id}/log", headers=auth).text)
    seen = [d.get(p, headers=auth).text for p in
            ("/tasks", f"/tasks/{task_id}", "/tasks?format=json", f"/tasks/{task_id}/log")]
    assert not any("XYZ" in text for text in seen + [d.stderr()])
    assert "reads and cancels" not in d.stderr()  # the token guards them: no warning


def test_body_over_1_mib_is_413_before_it_is_read(idle_daemon):
    start = time.monotonic()
    answer = raw_exchange(idle_daemon.port, b"POST /task?name=example HTTP/1.1\r\n"
                                       b"Host: localhost\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 2000000\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert time.monotonic() - start < 2
    assert idle_daemon.get("/tasks?format=json").json() == []


def test_expect_100_continue_is_answered_at_once(tmp_path, daemons):
    add_script(tmp_path, "hook", "run", "cat\n")
    d = daemons()
    with socket.create_connection(("127.0.0.1", d.port), timeout=DEADLINE_S) as s:
        s.sendall(b"POST /task?name=hook HTTP/1.1\r\nHost: localhost\r\n"
                  b"Content-Type: text/plain\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        s.settimeout(0.5)  # curl waits a second before sending the body anyway
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
        s.settimeout(DEADLINE_S)
        s.sendall(b"hello")
        assert b"201 Created" in s.recv(4096)


@pytest.mark.parametrize("daemon_fixture, headers, status", [
    ("idle_daemon", b"Content-Length: 2000000\r\n", b"413"),
    ("idle_daemon", b"Transfer-Encoding: chunked\r\n", b"411"),
    ("token_daemon", b"Content-Length: 5\r\n", b"401"),
    ("secret_daemon", b"Content-Length: 5\r\n", b"401"),
])
def test_a_body_that_will_be_refused_is_refused_before_100_continue(request, daemon_fixture,
                                                                   headers, status):
    d = request.getfixturevalue(daemon_fixture)
    answer = raw_exchange(d.port, b"POST /task?name=hook HTTP/1.1\r\nHost: localhost\r\n"
                          b"Content-Type: text/plain\r\nExpect: 100-continue\r\n" + headers +
                          b"\r\n")
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")


def test_body_up_to_1_mib_is_accepted(tmp_path, daemons):
    add_script(tmp_path, "big", "run", "wc -c\n")
    d = daemons()
    body = b"x" * tasktrain.MAX_BODY_BYTES
    task = d.wait_status(d.submit("big", body=body, headers={"Content-Type": "text/plain"}))
    assert f"{len(body)}" in task["output"]


MALFORMED = [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\n\r\n", 505),
    (b"GET / FOO/1.1\r\n\r\n", 400),
    (b"GET /\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + (b"X: " + b"a" * 40000 + b"\r\n") * 2 + b"\r\n", 431),  # in all
    (b"POST /task?name=example HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
    (b"POST /task?name=example HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    # Python 3.11 refuses int() of over 4,300 digits: this was a 500.
    pytest.param(b"POST /task?name=example HTTP/1.1\r\nContent-Length: " + b"9" * 5000
                 + b"\r\n\r\n", 413, id="Content-Length of 5000 digits"),
    (b"POST /task?name=example HTTP/1.1\r\nContent-Length: \xb2\r\n\r\nab", 400),
    (b"POST /task?name=example HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\nab", 400),
    (b"POST /task?name=example HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (b"POST /task?name=ex\xc3ample HTTP/1.1\r\n\r\n", 400),
    (b"POST /task?name=example&k=%C3 HTTP/1.1\r\n\r\n", 400),
    (b"POST /task?name=example&k=%G1 HTTP/1.1\r\n\r\n", 400),
    (b"G<T /tasks HTTP/1.1\r\n\r\n", 400),  # a method is a token
    (b"GET http://[x]/tasks HTTP/1.1\r\n\r\n", 400),  # no URL: urlsplit raised
    (b"\r\n" * 9 + b"GET / HTTP/1.1\r\n\r\n", 400),  # more empty lines than skipped
    (b"POST /task?name=example HTTP/1.1\r\nNo colon\r\nContent-Length: 5\r\n\r\nhello", 400),
    (b"POST /task?name=example HTTP/1.1\r\nContent-Length : 5\r\n\r\nhello", 400),
    (b"GET / HTTP/1.1\r\n: no name\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX-A: b\r\n folded\r\n\r\n", 400),  # RFC 9112 section 5.2
    (b"GET / HTTP/1.1\r\nX-A: b\x00c\r\n\r\n", 400),
    (b"GET /\r\n", 400),  # HTTP/0.9 is refused before any header line is awaited
    (b"POST /task?name=example HTTP/0.9\r\n\r\n", 400),  # no status line, and queued
    (b"GET / HTTP/0.5\r\n\r\n", 400),
]


@pytest.mark.parametrize("raw, status", MALFORMED)
def test_malformed_requests_get_a_4xx_and_the_daemon_keeps_serving(idle_daemon, raw, status):
    answer = raw_exchange(idle_daemon.port, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode(), answer[:200]
    assert b"charset=utf-8" in head and b"X-Req-Count" in head
    assert body.count(b"\n") == 1
    assert idle_daemon.get("/").status == 200
    assert idle_daemon.get("/tasks?format=json").json() == []


def test_a_request_head_holds_up_to_100_header_fields(idle_daemon):
    fields = b"".join(b"X-A%d: b\r\n" % i for i in range(100))
    answer = raw_exchange(idle_daemon.port, b"GET / HTTP/1.1\r\n" + fields + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    field = b"X: " + b"a" * 65000 + b"\r\n"  # and 64 KiB of them in all
    answer = raw_exchange(idle_daemon.port, b"GET / HTTP/1.1\r\n" + field + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_empty_lines_before_a_request_line_are_skipped(idle_daemon):
    answer = raw_exchange(idle_daemon.port, b"\r\n\nGET / HTTP/1.1\r\n\r\n")  # RFC 9112 2.2
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"Task Manager is running!")


def test_a_refused_body_the_client_sends_anyway_is_read_so_that_it_gets_the_answer(
        idle_daemon):
    size = 10 * tasktrain.MAX_BODY_BYTES  # more than the kernel's buffers hold
    head = b"POST /task?name=example HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size
    with socket.create_connection(("127.0.0.1", idle_daemon.port), timeout=DEADLINE_S) as s:
        # Closed with the body unread, the connection would be reset under the sender.
        s.sendall(head + b"x" * size)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ") and answer.endswith(b"bytes.\n")


def test_a_length_declared_twice_alike_is_one_length(daemon):
    answer = raw_exchange(daemon.port, b"POST /task?name=example HTTP/1.1\r\n"
                          b"Content-Type: text/plain\r\nContent-Length: 2\r\n"
                          b"Content-Length: 2\r\n\r\nab")
    assert answer.startswith(b"HTTP/1.1 201 ")


def test_clients_that_hang_up_early_leave_no_traceback_in_the_log(daemon):
    for path in ("/", "/tasks?format=text", "/tasks/0123456789abc"):
        with socket.create_connection(("127.0.0.1", daemon.port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    assert daemon.get("/").status == 200
    daemon.stop()
    assert "Traceback" not in daemon.stderr() and "Exception" not in daemon.stderr()


def test_stalled_clients_do_not_hold_up_anyone(daemon):
    stalled = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", daemon.port))
        s.sendall(b"POST /task?name=example HTTP/1.1\r\nContent-Length: 10\r\n\r\nab")
        stalled.append(s)
    try:
        start = time.monotonic()
        assert daemon.get("/").status == 200
        daemon.submit("example")
        assert time.monotonic() - start < 2
    finally:
        for s in stalled:
            s.close()


def test_a_daemon_out_of_file_descriptors_waits_to_accept_instead_of_spinning(tmp_path,
                                                                              daemons):
    few_fds = ("import os, resource, sys\nresource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))\n"
               "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")
    d = daemons(wrapper=few_fds)
    idle = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(48)]
    try:
        wait_for(lambda: "cannot accept connections: Too many open files" in d.stderr())
        def cpu_s():
            with open(f"/proc/{d.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        before = cpu_s()
        time.sleep(1)  # a spinning accept loop would take the whole second
        assert cpu_s() - before < 0.5
    finally:
        for conn in idle:
            conn.close()
    assert d.get("/").status == 200
    wait_for(lambda: "accepting connections again" in d.stderr())
    assert d.stderr().count("cannot accept connections") == 1


def test_an_http_1_0_client_that_asks_to_keep_alive_is_told_so(idle_daemon):
    with socket.create_connection(("127.0.0.1", idle_daemon.port), timeout=DEADLINE_S) as s:
        s.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = b""
        while not first.endswith(b"is running!") and (chunk := s.recv(65536)):
            first += chunk
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")  # on the same connection: it stayed open
        second = b"".join(iter(lambda: s.recv(65536), b""))  # then closed, as 1.0 does
    assert b"\r\nConnection: keep-alive\r\n" in first and first.endswith(b"is running!")
    assert b"\r\nConnection: close\r\n" in second and second.endswith(b"is running!")


def test_nothing_of_a_keep_alive_requests_headers_reaches_the_next(idle_daemon):
    with socket.create_connection(("127.0.0.1", idle_daemon.port), timeout=DEADLINE_S) as s:
        s.sendall(b"GET /nope HTTP/1.1\r\nAccept: application/json\r\n\r\n"
                  b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
        answer = b"".join(iter(lambda: s.recv(65536), b""))  # the 414 closes the connection
    first, second = answer.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"404") and b'{"error": "Not found"}' in first
    assert second.startswith(b"414") and b"text/plain" in second and b"{" not in second


# ----------------------------------------------------------------------------
# §7 Forge webhooks as they really arrive
# ----------------------------------------------------------------------------

# Prints the forge's variables (a stale TASKTRAIN_EVENT from the daemon's environment
# must not show) and keeps its stdin where the test can compare it byte for byte.
FORGE_SCRIPT = ('cat > "$STDIN_DIR/$TASKTRAIN_TASK_ID"\n'
                "env | grep '^TASKTRAIN_[CDER]' | sort\n")


@pytest.fixture(scope="module")
def forge_daemon(tmp_path_factory):
    """One daemon with --secret hush for the forge tests; each posts bodies of its own."""
    root = tmp_path_factory.mktemp("forge")
    (root / "stdin").mkdir()
    for task in ("hook", "pushes"):
        add_script(root, task, "run", FORGE_SCRIPT)
    (root / "scripts.d" / "pushes" / ".task.ini").write_text("[task]\nevents = push tag_push\n")
    d = Daemon(root, "--secret", "hush",
               env={"STDIN_DIR": str(root / "stdin"), "TASKTRAIN_EVENT": "stale"})
    yield d
    d.stop()


def forge_headers(forge, body, event, delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958",
                  secret="hush"):
    """The headers each forge sends with a delivery, signature included."""
    hex256 = sign(body, secret)
    if forge == "github":
        return {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery, "X-GitHub-Hook-ID": "7",
                "X-Hub-Signature": "sha1=" + hmac.new(secret.encode(), body, "sha1").hexdigest(),
                "X-Hub-Signature-256": "sha256=" + hex256, "User-Agent": "GitHub-Hookshot/3c1e2a7"}
    if forge == "gitea":  # Gitea and Forgejo also send Gogs's and GitHub's headers
        return {"X-Gitea-Event": event, "X-Gitea-Event-Type": event, "X-Gitea-Delivery": delivery,
                "X-Gitea-Signature": hex256, "X-Gogs-Event": event, "X-Gogs-Delivery": delivery,
                "X-Gogs-Signature": hex256, "X-GitHub-Event": event,
                "X-GitHub-Delivery": delivery, "X-Hub-Signature-256": "sha256=" + hex256}
    if forge == "gogs":
        return {"X-Gogs-Event": event, "X-Gogs-Delivery": delivery, "X-Gogs-Signature": hex256}
    assert forge == "gitlab"
    return {"X-Gitlab-Event": event, "X-Gitlab-Event-UUID": delivery, "X-Gitlab-Token": secret,
            "X-Gitlab-Instance": "https://gitlab.example.com", "User-Agent": "GitLab/17.5.1"}


def post_delivery(d, body, headers, query="name=hook", content_type="application/json"):
    return d.request("POST", "/task?" + query, body=body,
                     headers={"Content-Type": content_type, **headers})


def forge_variables(d, task_id):
    """The TASKTRAIN_ forge variables a task's script saw, and the stdin it read."""
    output = d.wait_status(task_id)["output"]
    variables = dict(re.findall(r"^TASKTRAIN_(\w+)=(.*)$", output, re.M))
    return variables, (d.root / "stdin" / task_id).read_bytes()


def tasks_now(d):
    count = len(d.get("/tasks?format=json&limit=1000").json())
    assert count < 1000, "the list's largest page holds them all, or the count means nothing"
    return count


def github_push_payload(after, ref="refs/heads/main"):
    """A push payload as GitHub sends it (the shape of its docs' example): well over 8 KiB."""
    api, web = "https://api.github.com/repos/octo-org/site", "https://github.com/octo-org/site"
    owner = {"name": "octo-org", "email": None, "login": "octo-org", "id": 6811672,
             "node_id": "MDEyOk9yZ2FuaXphdGlvbjY4MTE2NzI=", "type": "Organization",
             "avatar_url": "https://avatars.githubusercontent.com/u/6811672?v=4",
             "url": "https://api.github.com/users/octo-org", "html_url": "https://github.com/octo-org",
             "gravatar_id": "", "site_admin": False,
             **{f"{k}_url": f"https://api.github.com/users/octo-org/{k}{t}" for k, t in (
                 ("followers", ""), ("following", "{/other_user}"), ("gists", "{/gist_id}"),
                 ("starred", "{/owner}{/repo}"), ("subscriptions", ""), ("organizations", ""),
                 ("repos", ""), ("events", "{/privacy}"), ("received_events", ""))}}
    templates = ("forks", "keys", "collaborators{/collaborator}", "teams", "hooks",
                 "issues/events{/number}", "events", "assignees{/user}", "branches{/branch}",
                 "tags", "blobs{/sha}", "git/tags{/sha}", "git/refs{/sha}", "git/trees{/sha}",
                 "statuses/{sha}", "languages", "stargazers", "contributors", "subscribers",
                 "subscription", "commits{/sha}", "git/commits{/sha}", "comments{/number}",
                 "issues/comments{/number}", "contents/{+path}", "compare/{base}...{head}",
                 "merges", "{archive_format}{/ref}", "downloads", "issues{/number}",
                 "pulls{/number}", "milestones{/number}", "notifications{?since,all,participating}",
                 "labels{/name}", "releases{/id}", "deployments")
    repository = {"id": 186853002, "node_id": "MDEwOlJlcG9zaXRvcnkxODY4NTMwMDI=", "name": "site",
                  "full_name": "octo-org/site", "private": False, "owner": owner,
                  "html_url": web, "description": "The web site", "fork": False, "url": web,
                  **{t.split("{")[0].split("/")[0] + "_url": f"{api}/{t}" for t in templates},
                  "created_at": 1557933565, "updated_at": "2026-11-30T14:12:01Z",
                  "pushed_at": 1764685921, "git_url": "git://github.com/octo-org/site.git",
                  "ssh_url": "git@github.com:octo-org/site.git",
                  "clone_url": web + ".git", "svn_url": web, "homepage": None, "size": 1204,
                  "stargazers_count": 3, "watchers_count": 3, "language": "Python",
                  "has_issues": True, "has_projects": True, "has_downloads": True,
                  "has_wiki": True, "has_pages": False, "forks_count": 0, "archived": False,
                  "disabled": False, "open_issues_count": 2, "license": None, "forks": 0,
                  "open_issues": 2, "watchers": 3, "default_branch": "main",
                  "stargazers": 3, "master_branch": "main", "organization": "octo-org",
                  "topics": ["deploy", "website"], "visibility": "public", "mirror_url": None,
                  "allow_forking": True, "is_template": False, "has_discussions": False,
                  "web_commit_signoff_required": False, "custom_properties": {}}
    person = {"name": "Mona Lisa Octocat", "email": "mona@example.com", "username": "octocat"}
    commits = [{"id": f"{i}" * 40, "tree_id": f"{i}e" * 20, "distinct": True,
                "message": f"Fix the deploy script, step {i}\n\nLonger explanation " * 3,
                "timestamp": "2026-12-02T14:12:01+01:00", "url": f"{web}/commit/{i * 40}",
                "author": person, "committer": person, "added": [f"docs/step-{i}.md"],
                "removed": [], "modified": ["deploy.sh", "README.md"]} for i in range(1, 4)]
    payload = {"ref": ref, "before": "0" * 39 + "1", "after": after, "repository": repository,
               "pusher": {"name": "octocat", "email": "mona@example.com"},
               "organization": owner, "sender": owner, "created": False, "deleted": False,
               "forced": False, "base_ref": None, "compare": f"{web}/compare/000000000001...{after[:12]}",
               "commits": commits, "head_commit": commits[-1]}
    return json.dumps(payload, separators=(",", ":")).encode()


@pytest.mark.parametrize("forge, event, payload, expected", [
    ("github", "push", {"ref": "refs/heads/main", "after": "1" * 40},
     {"EVENT": "push", "REF": "refs/heads/main", "COMMIT": "1" * 40}),
    ("gitea", "push", {"ref": "refs/heads/dev", "after": "2" * 40},
     {"EVENT": "push", "REF": "refs/heads/dev", "COMMIT": "2" * 40}),
    ("gogs", "push", {"ref": "refs/heads/main", "after": "3" * 40},
     {"EVENT": "push", "REF": "refs/heads/main", "COMMIT": "3" * 40}),
    ("gitlab", "Push Hook", {"object_kind": "push", "ref": "refs/heads/main",
                             "after": "4" * 40, "checkout_sha": "4" * 40},
     {"EVENT": "Push Hook", "REF": "refs/heads/main", "COMMIT": "4" * 40}),
    ("gitlab", "Tag Push Hook", {"object_kind": "tag_push", "ref": "refs/tags/v1.0",
                                 "after": "a" * 40, "checkout_sha": "5" * 40},
     {"EVENT": "Tag Push Hook", "REF": "refs/tags/v1.0", "COMMIT": "5" * 40}),
    ("gitlab", "Merge Request Hook", {"object_kind": "merge_request"},
     {"EVENT": "Merge Request Hook"}),
    ("github", "release", [1, 2], {"EVENT": "release"}),
])
def test_a_forge_event_gives_its_scripts_event_delivery_ref_and_commit(forge_daemon, forge,
                                                                       event, payload, expected):
    d, delivery = forge_daemon, f"{forge}-{event}-0b7e".replace(" ", "")
    body = json.dumps(payload).encode()
    task_id = d.submit("hook", body=body, headers={
        "Content-Type": "application/json", **forge_headers(forge, body, event, delivery)})
    variables, stdin = forge_variables(d, task_id)
    assert variables == {**expected, "DELIVERY": delivery} and stdin == body
    fields = d.task(task_id)
    assert {k: fields[k] for k in ("event", "delivery", "ref", "commit")} == {
        "event": expected["EVENT"], "delivery": delivery,
        "ref": expected.get("REF"), "commit": expected.get("COMMIT")}


def test_a_request_without_a_forge_header_is_no_forge_event(forge_daemon):
    body = b'{"ref": "refs/heads/main", "after": "%s"}' % (b"6" * 40)
    task_id = forge_daemon.submit("hook", body=body, headers={
        "Content-Type": "application/json", "X-Hub-Signature-256": "sha256=" + sign(body)})
    variables, stdin = forge_variables(forge_daemon, task_id)
    assert variables == {} and stdin == body  # not even the daemon's own TASKTRAIN_EVENT
    fields = forge_daemon.task(task_id)
    assert [fields[k] for k in ("event", "delivery", "ref", "commit")] == [None] * 4


@pytest.mark.parametrize("content_type", [
    "application/x-www-form-urlencoded", "application/x-www-form-urlencoded; charset=utf-8",
    "application/json",
])
def test_a_github_payload_over_8_kib_is_stdin_in_either_content_type(forge_daemon, content_type):
    after = hashlib.sha1(content_type.encode()).hexdigest()
    payload = github_push_payload(after)
    body = payload
    if content_type.startswith("application/x-www-form-urlencoded"):
        body = urllib.parse.urlencode({"payload": payload}).encode()
    assert len(payload) > 8 * 1024 and len(body) > 8 * 1024
    resp = post_delivery(forge_daemon, body, forge_headers("github", body, "push", "d-" + after),
                         content_type=content_type)
    assert resp.status == 201, resp.text
    task_id = record_fields(resp.text)["ID"]
    variables, stdin = forge_variables(forge_daemon, task_id)
    assert stdin == payload  # the signature was checked over `body`, as sent
    assert (variables["REF"], variables["COMMIT"]) == ("refs/heads/main", after)
    assert forge_daemon.task(task_id)["params"] == {}


@pytest.mark.parametrize("forge", ["gitea", "gogs"])
def test_a_form_delivery_signed_over_its_payload_as_gitea_signs_it_is_accepted(forge_daemon,
                                                                                forge):
    d = forge_daemon
    after = hashlib.sha1(forge.encode()).hexdigest().encode()
    payload = b'{"ref": "refs/heads/main", "after": "%s"}' % after
    body = urllib.parse.urlencode({"payload": payload}).encode()
    headers = forge_headers(forge, payload, "push", "d-form-" + forge)  # the JSON is signed
    resp = post_delivery(d, body, headers, content_type="application/x-www-form-urlencoded")
    assert resp.status == 201, resp.text
    task_id = record_fields(resp.text)["ID"]
    variables, stdin = forge_variables(d, task_id)
    assert stdin == payload and variables["REF"] == "refs/heads/main"
    before = tasks_now(d)
    # What the signature covers is the delivery: the JSON sent alone is the same again.
    again = post_delivery(d, payload, headers, content_type="application/json")
    assert (again.status, again.headers["Location"]) == (200, "tasks/" + task_id)
    form = "application/x-www-form-urlencoded"
    for refused_body, refused_headers in [
            # A form with more than the payload in it: its other fields are not signed.
            (body + b"&name=evil", headers), (b"x=1&" + body, headers),
            # The payload field of a form that is no forge event is a parameter.
            (body, {k: v for k, v in headers.items() if "Event" not in k}),
            # Nor is any other field signed so.
            (urllib.parse.urlencode({"x": payload}).encode(), headers)]:
        resp = post_delivery(d, refused_body, refused_headers, content_type=form)
        assert (resp.status, resp.text) == (401, "Bad webhook signature.\n"), refused_body
    # The URL is not signed, as for any signed delivery.
    fresh = b'{"ref": "refs/heads/dev"}'
    resp = post_delivery(d, urllib.parse.urlencode({"payload": fresh}).encode(),
                         forge_headers(forge, fresh, "push"), "name=hook&branch=x", form)
    assert resp.status == 400 and "Query parameter 'branch' refused" in resp.text
    assert tasks_now(d) == before


def test_a_forged_form_is_refused_without_parsing_its_fields(forge_daemon):
    """Only a form that is one payload field is decoded before its signature is checked:
    1 MiB of fields took 0.4 s and 40 MB to parse, for anyone."""
    body = b"a&" * (512 * 1024 - 1)
    resp = post_delivery(forge_daemon, body, {"X-Gitea-Event": "push", "X-Gitea-Signature": "00"},
                         content_type="application/x-www-form-urlencoded")
    assert (resp.status, resp.text) == (401, "Bad webhook signature.\n")
    assert tasktrain.lone_payload_field(body) is None


@pytest.mark.parametrize("value", [
    b"%7B%22a%22%3A+%22%C3%A9+%2B%25_~%09%22%7D", b"plain", b"", b"%41%4a%4A+",
    b"\xff\x00 raw",
])
def test_a_lone_payload_field_decodes_as_a_form_does(value):
    assert tasktrain.lone_payload_field(b"payload=" + value) == \
        urllib.parse.unquote_to_bytes(value.replace(b"+", b" "))


@pytest.mark.parametrize("body", [
    b"payload=a&b=c", b"payload=a=b", b"payload=%4", b"payload=%zz", b"payload=a\r\nb",
    b"payload=a%\nb", b"x=1", b"payloads=1",
])
def test_a_form_that_is_not_one_payload_field_has_no_lone_payload(body):
    assert tasktrain.lone_payload_field(body) is None


def test_github_published_test_vector_signs_a_forge_event(tmp_path, daemons):
    add_script(tmp_path, "hook", "run", "cat; echo; echo \"$TASKTRAIN_EVENT\"\n")
    d = daemons("--secret", GITHUB_SECRET)
    assert "sha256=" + sign(GITHUB_BODY, GITHUB_SECRET) == GITHUB_SIGNATURE
    # Hello, World! as a form has no payload field: the body as sent is the payload.
    headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": GITHUB_SIGNATURE,
               "Content-Type": "application/x-www-form-urlencoded"}
    task_id = d.submit("hook", body=GITHUB_BODY, headers=headers)
    assert "\nHello, World!\npush\n" in d.wait_status(task_id)["output"]
    assert d.task(task_id)["params"] == {} and d.task(task_id)["ref"] is None
    headers["Content-Type"] = "application/json"  # the same body again: a replay
    assert d.submit("hook", body=GITHUB_BODY, headers=headers, expect=200) == task_id
    headers["X-Hub-Signature-256"] = GITHUB_SIGNATURE[:-1] + "f"
    assert d.request("POST", "/task?name=hook", body=GITHUB_BODY, headers=headers).status == 401


def test_ping_is_answered_200_once_authorized_and_queues_nothing(forge_daemon):
    d, before = forge_daemon, tasks_now(forge_daemon)
    body = b'{"zen": "Keep it logically awesome.", "hook_id": 7, "hook": {"events": ["push"]}}'
    headers = forge_headers("github", body, "ping", "d-ping")
    for name in ("hook", "pushes"):  # pushes accepts push and tag_push only: a ping all the same
        resp = post_delivery(d, body, headers, query="name=" + name)
        assert (resp.status, resp.text) == (
            200, f"Ping received: this webhook can start task {name!r}; nothing queued.\n")
    resp = post_delivery(d, body, {**headers, "Accept": "application/json"})
    assert resp.json() == {"message": "Ping received: this webhook can start task 'hook'; "
                                      "nothing queued."}
    del headers["X-Hub-Signature-256"], headers["X-Hub-Signature"]
    assert post_delivery(d, body, headers).status == 401
    assert post_delivery(d, body, forge_headers("github", body, "ping"),
                         query="name=nosuch").status == 404
    assert tasks_now(d) == before


@pytest.mark.parametrize("forge, event, status, answer", [
    ("github", "push", 201, None),
    ("gitlab", "Tag Push Hook", 201, None),
    ("gitea", "release", 202, "Event 'release' ignored: {scripts}/pushes/.task.ini accepts only "
                              "push, tag_push; nothing queued.\n"),
    ("gitlab", "Merge Request Hook", 202, "Event 'merge_request' ignored: {scripts}/pushes/"
                                          ".task.ini accepts only push, tag_push; nothing queued.\n"),
    (None, None, 201, None),  # no forge event: the setting does not apply
])
def test_events_setting_accepts_only_the_events_it_names(forge_daemon, forge, event, status,
                                                         answer):
    d, before = forge_daemon, tasks_now(forge_daemon)
    body = json.dumps({"ref": "refs/heads/main", "case": f"{forge} {event}"}).encode()
    headers = (forge_headers(forge, body, event) if forge
               else {"X-Hub-Signature-256": "sha256=" + sign(body)})
    resp = post_delivery(d, body, headers, query="name=pushes")
    assert resp.status == status, resp.text
    if answer:
        assert resp.text == answer.format(scripts=d.scripts)
    assert tasks_now(d) == before + (status == 201)


@pytest.mark.parametrize("query", [
    "name=hook", "name=other", "name=hook&repo=/attacker.git", "name=nosuch&x=1", "", "name=!",
])
@pytest.mark.parametrize("forge", ["github", "gitlab"])
def test_a_signed_body_already_accepted_is_answered_with_its_task_whatever_the_url(
        forge_daemon, forge, query):
    d = forge_daemon
    body = json.dumps({"ref": "refs/heads/main", "case": [forge, query]}).encode()
    headers = forge_headers(forge, body, "push", "d-first")
    first = post_delivery(d, body, headers)
    assert first.status == 201
    task_id = record_fields(first.text)["ID"]
    d.wait_status(task_id)  # ended: its body is dropped, the key to it is kept
    before = tasks_now(d)
    again = post_delivery(d, body, {**headers, "X-GitHub-Delivery": "d-again"}, query=query)
    assert (again.status, again.headers["Location"]) == (200, "tasks/" + task_id), again.text
    assert record_fields(again.text)["STATUS"] == "complete"
    assert again.text == d.get(f"/tasks/{task_id}").text  # its output too: the record
    assert tasks_now(d) == before


@pytest.mark.parametrize("forge, query", [
    ("github", "name=hook&repo=/attacker.git"), ("gitlab", "name=hook&branch=main"),
    (None, "repo=x&name=hook"),
])
def test_a_signed_request_may_carry_no_query_parameter_but_name(forge_daemon, forge, query):
    d, before = forge_daemon, tasks_now(forge_daemon)
    body = json.dumps({"ref": "refs/heads/main", "case": query}).encode()
    headers = (forge_headers(forge, body, "push") if forge
               else {"X-Gitea-Signature": sign(body)})
    resp = post_delivery(d, body, headers, query=query)
    key = re.search(r"(repo|branch)=", query).group(1)
    assert (resp.status, resp.text) == (400, f"Query parameter {key!r} refused: a webhook "
                                             "signature does not cover the URL, so a signed "
                                             "request may carry only name there.\n")
    assert tasks_now(d) == before


def test_a_delivery_sent_again_with_the_token_runs_again_with_its_params(tmp_path, daemons):
    add_script(tmp_path, "hook", "run", 'echo "$TASKTRAIN_EVENT $TASKTRAIN_REF $*"\n')
    d = daemons("--secret", "hush", "--token", "tok")
    body = b'{"ref": "refs/heads/main"}'
    headers = {"Content-Type": "application/json", **forge_headers("github", body, "push")}
    auth = {"Authorization": "Bearer tok"}
    first = d.submit("hook", body=body, headers=headers)
    wait_for(lambda: d.get(f"/tasks/{first}?format=json", headers=auth).json()["finished"])
    assert d.submit("hook", body=body, headers=headers, expect=200) == first
    again = d.submit("hook", body=body, headers={**headers, **auth}, branch="main")
    log = wait_for(lambda: "exit code" in (t := d.get(f"/tasks/{again}/log", headers=auth).text)
                   and t)
    assert again != first and "push refs/heads/main --name=hook --branch=main" in log


@pytest.mark.parametrize("headers, payload, status, reason", [
    ({"X-GitHub-Event": ""}, b"{}", 400, "Bad X-GitHub-Event header: ''."),
    ({"X-GitHub-Event": "push;rm"}, b"{}", 400, "Bad X-GitHub-Event header: 'push;rm'."),
    # str.split() takes these for spaces: the scripts would have got them
    ({"X-GitHub-Event": "push\x1fhook"}, b"{}", 400, "Bad X-GitHub-Event header: 'push\\x1fhook'."),
    ({"X-Gitlab-Event": "ping\xa0hook"}, b"{}", 400, "Bad X-Gitlab-Event header: 'ping\\xa0hook'."),
    ({"X-GitHub-Event": "push", "X-GitHub-Delivery": "a b"}, b"{}", 400,
     "Bad X-GitHub-Delivery header: 'a b'."),
    ({"X-Gitea-Event": "push"}, b'{"ref": "refs/heads/a\\u0000b"}', 400,
     "The payload's ref is over 1024 characters or holds a control character."),
    ({"X-Gitea-Event": "push"}, b'{"ref": "refs/heads/%s"}' % (b"x" * 1020), 400,
     "The payload's ref is over 1024 characters or holds a control character."),
    ({"X-Gitea-Event": "push"}, b'{"after": "\\ud800"}', 400,
     "The payload's commit is not valid Unicode."),
    ({"X-Gitea-Event": "push"}, b"[" * 100_000 + b"]" * 100_000, 201, None),
    ({"X-Gitea-Event": "push"}, b'{"ref": 7, "after": null}', 201, None),
])
def test_forge_headers_and_payload_fields_are_checked(forge_daemon, headers, payload, status,
                                                      reason):
    d, before = forge_daemon, tasks_now(forge_daemon)
    resp = post_delivery(d, payload, {**headers, "X-Gitea-Signature": sign(payload)})
    assert resp.status == status, resp.text
    if reason:
        assert resp.text == reason + "\n"
    else:
        assert d.task(record_fields(resp.text)["ID"])["ref"] is None
    assert tasks_now(d) == before + (status == 201)


def test_the_store_finds_a_kept_webhook_key_also_once_its_task_has_ended(tmp_path):
    store = tasktrain.TaskStore(str(tmp_path))
    event = tasktrain.ForgeEvent("push", "d-1", "refs/heads/main", "1" * 40)
    first = store.submit("hook", {}, b"{}", event=event, webhook_key="k1")
    assert store.submit("hook", {"other": "x"}, b"[]", webhook_key="k1").task.id == first.task.id
    claimed, synced = store.start_claiming()
    synced()
    store.finish(claimed.id, "complete", 0, [])
    replayed = store.submit("other", {}, b"", webhook_key="k1")
    assert (replayed.task.id, replayed.task.status, replayed.is_new) == (
        first.task.id, "complete", False)
    assert store.webhook_task("k1").task.id == first.task.id and store.webhook_task("k2") is None
    assert (replayed.task.event, replayed.task.commit) == ("push", "1" * 40)
    assert store.submit("hook", {}, b"{}", event=event).is_new  # no key: no replay
    store.close()


# The tasks table of the first release, before the forge's columns.
FIRST_SCHEMA = """
CREATE TABLE tasks (id TEXT PRIMARY KEY, name TEXT NOT NULL, params TEXT NOT NULL,
    body BLOB NOT NULL, fingerprint TEXT NOT NULL, status TEXT NOT NULL,
    created_us INTEGER NOT NULL, started_us INTEGER, finished_us INTEGER, exit_code INTEGER,
    scripts TEXT NOT NULL DEFAULT '[]', pgid INTEGER);
CREATE INDEX tasks_by_status ON tasks (status, id);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
INSERT INTO tasks (id, name, params, body, fingerprint, status, created_us)
    VALUES ('5f0000000000a', 'hook', '{}', x'', 'f', 'pending', 1593835520000010);
"""


def test_a_database_of_the_first_release_gains_every_added_column_on_open(tmp_path):
    with contextlib.closing(sqlite3.connect(tmp_path / "tasks.sqlite3")) as db:
        db.executescript(FIRST_SCHEMA)
    store = tasktrain.TaskStore(str(tmp_path))
    old = store.get("5f0000000000a")
    assert (old.status, old.event, old.ref, old.commit, old.superseded_by) == (
        "pending", None, None, None, None)
    event = tasktrain.ForgeEvent("push", "d-1", "refs/heads/main", "1" * 40)
    new = store.submit("hook", {}, b"{}", event=event, webhook_key="k", supersede=("branch",))
    assert store.status("5f0000000000a") == "cancelled"
    store.close()
    store = tasktrain.TaskStore(str(tmp_path))  # a second open adds nothing twice
    stored = store.get(new.task.id)
    assert (stored.event, stored.delivery, stored.ref, stored.commit) == event
    assert store.webhook_task("k").task.id == new.task.id
    assert store.get("5f0000000000a").superseded_by == new.task.id
    store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "tasks.sqlite3")) as db:
        columns = {(row[1], row[2]) for row in db.execute("PRAGMA table_info(tasks)")}
    assert {(name, declared.split()[0]) for name, declared in tasktrain.ADDED_COLUMNS} <= columns


# ----------------------------------------------------------------------------
# §8 Task settings
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, settings", [
    (None, tasktrain.TaskSettings()),
    ("", tasktrain.TaskSettings()),
    ("# only a comment\n", tasktrain.TaskSettings()),
    ("[task]\n", tasktrain.TaskSettings()),
    ("[task]\nevents = push tag_push  # GitLab's names\n",
     tasktrain.TaskSettings(events=frozenset({"push", "tag_push"}))),
    ("[task]\nsupersede = ref branch ref\ntimeout = 90\n",
     tasktrain.TaskSettings(supersede=("ref", "branch"), timeout_s=90.0)),
    ("; no limit for this one\n[task]\nTimeout = 0\n", tasktrain.TaskSettings(timeout_s=0.0)),
    ("\ufeff[task]\nevents = push\n", tasktrain.TaskSettings(events=frozenset({"push"}))),
])
def test_task_settings_are_read_and_default_where_absent(tmp_path, text, settings):
    if text is not None:
        (tmp_path / ".task.ini").write_text(text)
    assert tasktrain.read_task_settings(str(tmp_path), "scripts.d/deploy") == settings


@pytest.mark.parametrize("content, problem", [
    ("events = push\n", "line 1: expected the [task] line first, found 'events = push'."),
    ("[task\n", "line 1: expected the [task] line first, found '[task'."),
    ("[task]\npush\n", "line 2: not a 'key = value' line: 'push'."),
    ("[task]\nevents = push\nevents = tag_push\n", "line 3: 'events' is set twice."),
    ("[task]\n[task]\n", "line 2: [task] appears twice."),
    ("[task]\nevent = push\n", "unknown key 'event' in [task]: the keys are events, supersede, "
                               "timeout."),
    ("[deploy]\nevents = push\n", "unknown section [deploy]: the settings go in [task]."),
    ("[task]\n[extra]\n", "unknown section [extra]: the settings go in [task]."),
    ("[DEFAULT]\ntimeout = 5\n[task]\n", "unknown section [DEFAULT]: the settings go in [task]."),
    ("[task]\nevents =\n", "events is empty: name lowercase events such as push or tag_push, "
                           "or remove the line."),
    ("[task]\nevents = Push Hook\n", "events: 'Push' will not do: name lowercase events such as "
                                     "push or tag_push."),
    ("[task]\nsupersede = --force\n", "supersede: '--force' will not do: name parameters or ref."),
    ("[task]\ntimeout = soon\n", "timeout = 'soon' is not a number of seconds (0 or more)."),
    ("[task]\ntimeout = -1\n", "timeout = '-1' is not a number of seconds (0 or more)."),
    ("[task]\ntimeout = nan\n", "timeout = 'nan' is not a number of seconds (0 or more)."),
    ("[task]\ntimeout = inf\n", "timeout = 'inf' is not a number of seconds (0 or more)."),
    ("[task]\ntimeout = 1" + "0" * 20 + "\n", f"timeout = '1{'0' * 20}' is more than 1000000000 "
                                             "seconds."),
    # float() takes them all; the README says a number of seconds.
    ("[task]\ntimeout = 1e3\n", "timeout = '1e3' is not a number of seconds (0 or more)."),
    ("[task]\ntimeout = 1_0\n", "timeout = '1_0' is not a number of seconds (0 or more)."),
    ("[task]\ntimeout = \u0661\u0662\n", "timeout = '\u0661\u0662' is not a number of seconds "
                                          "(0 or more)."),
    # configparser's other delimiter; the README says `key = value`
    ("[task]\nevents: push\n", "line 2: not a 'key = value' line: 'events: push'."),
    (b"[task]\nevents = \xff\n", "it is not UTF-8 text."),
    (None, "cannot read it: Is a directory."),
])
def test_a_bad_settings_file_is_one_line_naming_the_file_and_the_problem(tmp_path, content,
                                                                         problem):
    path = tmp_path / ".task.ini"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(tasktrain.SettingsError) as refused:
        tasktrain.read_task_settings(str(tmp_path), "scripts.d/deploy")
    assert str(refused.value) == "scripts.d/deploy/.task.ini: " + problem


@pytest.mark.parametrize("change, status", [
    ("exec bit taken", 404), ("removed", 404), ("a folder now", 404),
    ("settings added", 500), ("settings edited", 500), ("settings removed", 201),
])
def test_a_change_to_a_task_folder_applies_to_the_very_next_submission(
        tmp_path, daemons, change, status):
    script = add_script(tmp_path, "deploy", "run", "exit 0\n")
    settings = tmp_path / "scripts.d" / "deploy" / ".task.ini"
    if change == "settings edited":
        settings.write_text("[task]\ntimeout = 9\n")
    elif change == "settings removed":
        settings.write_text("[task]\nbogus = 9\n")
    d = daemons()
    first = 500 if change == "settings removed" else 201
    assert d.request("POST", "/task?name=deploy").status == first
    if change == "exec bit taken":
        script.chmod(0o644)
    elif change == "removed":
        script.unlink()
    elif change == "a folder now":
        script.unlink()
        script.mkdir()
        (script / "run").write_text("#!/bin/sh\n")
        (script / "run").chmod(0o755)
    elif change == "settings added":
        settings.write_text("[task]\nbogus = 9\n")
    elif change == "settings edited":  # the same size, likely within the same clock tick
        settings.write_text("[task]\nbogus   = 9\n")
    else:
        settings.unlink()
    assert d.request("POST", "/task?name=deploy").status == status


def test_a_task_folder_and_its_settings_are_read_again_until_they_have_settled(tmp_path):
    add_script(tmp_path, "deploy", "run", "exit 0\n")
    (tmp_path / "scripts.d" / "deploy" / ".task.ini").write_text("[task]\ntimeout = 9\n")
    folders = tasktrain.TaskFolders(str(tmp_path / "scripts.d"), "scripts.d")
    scan = folders.scan("deploy")
    first = folders.settings("deploy")
    assert scan.scripts() == [str(tmp_path / "scripts.d" / "deploy" / "run")]
    assert first.timeout_s == 9
    # Both changed just now: a change within the same clock tick might not show, so
    # both are read again every time until they are older than SETTLED_NS.
    again = folders.scan("deploy")
    assert again is not scan and folders.settings("deploy") is not first


def test_settled_folders_and_settings_are_read_once_and_again_as_soon_as_they_change(
        tmp_path, monkeypatch):
    monkeypatch.setattr(tasktrain, "SETTLED_NS", 0)  # every file counts as settled
    folder = tmp_path / "scripts.d" / "deploy"
    script = add_script(tmp_path, "deploy", "b", "exit 0\n")
    settings = folder / ".task.ini"
    settings.write_text("[task]\ntimeout = 9\n")
    folders = tasktrain.TaskFolders(str(tmp_path / "scripts.d"), "scripts.d")
    stamps = iter(range(1, 100))

    def changed_folder():  # a kernel may stamp two changes in one clock tick alike
        stamp = next(stamps) * 1_000_000_000
        os.utime(folder, ns=(stamp, stamp))

    def look():
        scan = folders.scan("deploy")
        return scan, scan.scripts(), folders.settings("deploy")

    changed_folder()
    scan, scripts, first = look()
    assert scripts == [str(script)] and first.timeout_s == 9
    again, _, same = look()
    assert again is scan and same is first  # neither scanned nor read again
    settings.write_text("[task]\ntimeout = 10\n")  # one byte longer
    assert look()[2].timeout_s == 10
    notes = add_script(tmp_path, "deploy", "a", "exit 0\n", mode=0o644)
    changed_folder()
    assert look()[1] == [str(script)]
    notes.chmod(0o755)  # only the file changed: its exec bit is looked at every time
    assert look()[1] == [str(notes), str(script)]
    settings.unlink()
    changed_folder()
    assert look()[2] == tasktrain.TaskSettings()
    script.chmod(0o644)
    notes.unlink()
    changed_folder()
    assert look()[1] == []


@pytest.mark.parametrize("what", ["folder", "settings"])
def test_what_is_kept_of_a_task_folder_is_what_was_read_while_a_deploy_flips_its_link(
        tmp_path, monkeypatch, what):
    monkeypatch.setattr(tasktrain, "SETTLED_NS", 0)
    releases, scripts = tmp_path / "releases", tmp_path / "scripts.d"
    (releases / "old").mkdir(parents=True)
    (releases / "old" / ".task.ini").write_text("[task]\nevents = push\n")
    script = releases / "old" / "run"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (releases / "new" / "run").mkdir(parents=True)  # no script, only a folder
    (releases / "new" / ".task.ini").write_text("[task]\nevents = tag_push\n")
    scripts.mkdir()
    link = scripts / "deploy"

    def point_to(release):  # as `ln -sfn` does it: a new link renamed over the old
        (scripts / "next").symlink_to(releases / release)
        os.replace(scripts / "next", link)

    point_to("old")
    folders = tasktrain.TaskFolders(str(scripts), "scripts.d")
    looked_at = str(link / ".task.ini") if what == "settings" else str(link)
    real_stat, flips = os.stat, [functools.partial(point_to, "new")]

    def stat_then_flip(path, *args, **kwargs):  # the deploy flips the link just after
        info = real_stat(path, *args, **kwargs)
        if str(path) == looked_at and flips:
            flips.pop()()
        return info

    monkeypatch.setattr(os, "stat", stat_then_flip)
    look, in_new, in_old = {
        "folder": (lambda: folders.scan("deploy").scripts(), [], [str(link / "run")]),
        "settings": (lambda: folders.settings("deploy").events, {"tag_push"}, {"push"}),
    }[what]
    assert look() == in_new  # what it read: the new release
    point_to("old")  # a rollback
    assert look() == in_old


def test_a_client_that_took_nothing_for_a_whole_timeout_is_sent_nothing_more():
    daemon_side, client = socket.socketpair()
    with daemon_side, client:
        stream = tasktrain.ClientStream(daemon_side, 0.05)
        with pytest.raises(socket.timeout):
            while True:  # the client reads nothing: the socket's buffers fill
                stream.write(b"x" * 65536)
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while client.recv(1 << 20):  # room again, too late: the client is gone for us
                pass
        with pytest.raises(socket.timeout):  # at once, not after another timeout: each
            stream.write(b"x")               # flush on the way out would wait one more


def test_a_task_folder_that_cannot_be_scanned_is_scanned_again(tmp_path, monkeypatch):
    monkeypatch.setattr(tasktrain, "SETTLED_NS", 0)
    script = add_script(tmp_path, "deploy", "run", "exit 0\n")
    folders = tasktrain.TaskFolders(str(tmp_path / "scripts.d"), "scripts.d")
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:  # out of file descriptors: the scan fails, as it would for a moment in a flood
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, limits[1]))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        assert folders.scan("deploy").scripts() == []
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    assert folders.scan("deploy").scripts() == [str(script)]


def test_a_bad_settings_file_refuses_the_submission_with_500(tmp_path, daemons):
    add_script(tmp_path, "deploy", "run", "exit 0\n")
    settings = tmp_path / "scripts.d" / "deploy" / ".task.ini"
    settings.write_text("[task]\nevnets = push\n")
    d = daemons()
    resp = d.request("POST", "/task?name=deploy")
    assert (resp.status, resp.text) == (500, f"{d.scripts}/deploy/.task.ini: unknown key "
                                             "'evnets' in [task]: the keys are events, "
                                             "supersede, timeout.\n")
    assert d.get("/tasks?format=json").json() == []
    settings.write_text("[task]\nevents = push\n")  # read at every submission: fixed at once
    d.submit("deploy")
    settings.unlink()
    os.mkfifo(settings)  # an open would wait for a writer: held the submission, and the runner
    resp = d.request("POST", "/task?name=deploy")
    assert (resp.status, resp.text) == (500, f"{d.scripts}/deploy/.task.ini: it is not a "
                                             "regular file.\n")
    settings.unlink()
    settings.mkdir()
    fds = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
    for _ in range(5):
        resp = d.request("POST", "/task?name=deploy")
        assert (resp.status, resp.text) == (500, f"{d.scripts}/deploy/.task.ini: cannot read "
                                                 "it: Is a directory.\n")
    wait_for(lambda: len(os.listdir(f"/proc/{d.proc.pid}/fd")) <= fds)  # none left open


def test_settings_are_read_again_as_the_task_starts(tmp_path, daemons):
    add_script(tmp_path, "patient", "run", "sleep 0.2; echo done\n")
    (tmp_path / "scripts.d" / "patient" / ".task.ini").write_text("[task]\ntimeout = 0\n")
    add_script(tmp_path, "strict", "run", "sleep 30\n")
    add_script(tmp_path, "broken", "run", "echo ran\n")
    d = daemons("--timeout", "0.1", "--grace", "0.2")
    patient, strict, broken = d.submit("patient"), d.submit("strict"), d.submit("broken")
    # Written after the submissions: what counts is what the file says as each starts.
    (tmp_path / "scripts.d" / "strict" / ".task.ini").write_text("[task]\ntimeout = 0.05\n")
    (tmp_path / "scripts.d" / "broken" / ".task.ini").write_text("[task]\ntimeout = soon\n")
    add_script(tmp_path, "fifo", "run", "echo ran\n")
    fifo = d.submit("fifo")
    os.mkfifo(tmp_path / "scripts.d" / "fifo" / ".task.ini")
    assert d.wait_status(patient)["status"] == "complete"  # 0 overrides --timeout 0.1
    task = d.wait_status(strict)
    assert task["status"] == "failed" and "Timed out after 0.05 s." in task["output"]
    task = d.wait_status(broken)  # a file broken by then fails the task, saying why
    assert (task["status"], task["exit_code"], task["output"]) == ("failed", 2, (
        f"{d.scripts}/broken/.task.ini: timeout = 'soon' is not a number of seconds "
        "(0 or more). The task was not run.\n"))
    task = d.wait_status(fifo)
    assert (task["status"], task["exit_code"], task["output"]) == ("failed", 2, (
        f"{d.scripts}/fifo/.task.ini: it is not a regular file. The task was not run.\n"))


def test_a_new_task_supersedes_the_pending_ones_with_the_same_keys(tmp_path, daemons):
    add_script(tmp_path, "deploy", "run", UNTIL_GO + 'echo "$@" >> "$GO.ran"\n')
    (tmp_path / "scripts.d" / "deploy" / ".task.ini").write_text("[task]\nsupersede = branch\n")
    d = daemons()
    running = d.submit("deploy", branch="main", n="1")
    wait_for(lambda: d.task(running)["status"] == "running")
    old = d.submit("deploy", branch="main", n="2")
    other = d.submit("deploy", branch="dev", n="3")
    no_branch = d.submit("deploy", n="4")
    new = d.submit("deploy", branch="main", n="5")
    assert d.task(old)["status"] == "cancelled" and d.task(old)["superseded_by"] == new
    assert d.log(old) == f"Superseded by {new}.\n"
    assert d.task(running)["status"] == "running"  # a running task is never touched
    assert [d.task(i)["position"] for i in (other, no_branch, new)] == [1, 2, 3]
    newer = d.submit("deploy", n="6")  # no branch either: the same (absent) value
    assert d.task(no_branch)["superseded_by"] == newer
    (tmp_path / "go").touch()
    for task_id in (running, other, new, newer):
        assert d.wait_status(task_id)["status"] == "complete"
    assert (tmp_path / "go.ran").read_text() == (
        "--name=deploy --branch=main --n=1\n--name=deploy --branch=dev --n=3\n"
        "--name=deploy --branch=main --n=5\n--name=deploy --n=6\n")
    assert d.task(other)["superseded_by"] is None


def test_supersede_ref_keys_forge_pushes_by_their_ref(tmp_path, daemons):
    add_script(tmp_path, "site", "run", UNTIL_GO)
    (tmp_path / "scripts.d" / "site" / ".task.ini").write_text("[task]\nsupersede = ref\n")
    d = daemons("--secret", "hush")

    def push(ref, after):
        body = json.dumps({"ref": ref, "after": after}).encode()
        resp = post_delivery(d, body, forge_headers("github", body, "push", delivery=after),
                             query="name=site")
        assert resp.status == 201, resp.text
        return record_fields(resp.text)["ID"]

    running = push("refs/heads/main", "a1")
    wait_for(lambda: d.task(running)["status"] == "running")
    old, dev, new = (push("refs/heads/main", "a2"), push("refs/heads/dev", "b1"),
                     push("refs/heads/main", "a3"))
    assert [d.task(i)["superseded_by"] for i in (running, old, dev, new)] == [
        None, new, None, None]
    assert d.task(running)["status"] == "running" and d.task(dev)["position"] == 1
    (tmp_path / "go").touch()


@pytest.mark.parametrize("old, new, superseded", [
    ({"branch": "main", "env": "prod", "sha": "1"}, {"branch": "main", "env": "prod", "sha": "2"},
     True),
    ({"branch": "main", "env": "prod"}, {"branch": "main", "env": "test"}, False),
    ({"branch": "main"}, {"branch": "main", "env": "prod"}, False),
    ({"sha": "1"}, {"sha": "2"}, True),
    ({"branch": "Main", "env": "prod"}, {"branch": "main", "env": "prod"}, False),
])
def test_supersede_needs_the_same_values_for_every_key(tmp_path, old, new, superseded):
    store = tasktrain.TaskStore(str(tmp_path))
    keys = ("branch", "env")
    first = store.submit("deploy", old, supersede=keys).task
    second = store.submit("deploy", new, supersede=keys)
    assert store.status(first.id) == ("cancelled" if superseded else "pending")
    assert store.get(first.id).superseded_by == (second.task.id if superseded else None)
    store.submit("other", old, supersede=keys)  # only the same name
    assert store.status(first.id) == ("cancelled" if superseded else "pending")
    assert store.status(second.task.id) == "pending"
    store.close()


def test_an_identical_pending_submission_answers_it_and_supersedes_nothing(tmp_path):
    store = tasktrain.TaskStore(str(tmp_path))
    first = store.submit("deploy", {"branch": "main"}, supersede=("branch",))
    again = store.submit("deploy", {"branch": "main"}, supersede=("branch",))
    assert (again.is_new, again.task.id) == (False, first.task.id)
    assert store.status(first.task.id) == "pending" and store.pending_count() == 1
    store.close()


def test_superseding_frees_places_under_the_pending_limit(tmp_path):
    tasktrain.TaskStore(str(tmp_path)).close()
    db = sqlite3.connect(tmp_path / "tasks.sqlite3")
    base_us = time.time_ns() // 1000 - 10**7
    db.executemany(
        "INSERT INTO tasks (id, name, params, body, fingerprint, status, created_us) "
        "VALUES (?, 'deploy', ?, x'', ?, 'pending', ?)",
        [(tasktrain.format_id(base_us + i), json.dumps({"branch": str(i)}), str(i), base_us + i)
         for i in range(tasktrain.MAX_PENDING)])
    db.commit()
    db.close()
    store = tasktrain.TaskStore(str(tmp_path))
    with pytest.raises(tasktrain.QueueFull):
        store.submit("deploy", {"branch": "new"}, supersede=("branch",))
    replaced = store.submit("deploy", {"branch": "7", "sha": "2"}, supersede=("branch",))
    assert store.status(tasktrain.format_id(base_us + 7)) == "cancelled"
    assert replaced.is_new and store.pending_count() == tasktrain.MAX_PENDING
    store.close()


def test_a_failed_commit_supersedes_nothing_and_takes_back_the_log_line(tmp_path):
    store = tasktrain.TaskStore(str(tmp_path))
    submitted = store.submit("deploy", {"branch": "main"}, supersede=("branch",))
    submitted.synced()  # as a handler does before answering: this commits it
    first = submitted.task
    with store_refuses_status(tmp_path, "cancelled"), pytest.raises(sqlite3.IntegrityError):
        store.submit("deploy", {"branch": "main", "sha": "2"}, supersede=("branch",))
    assert store.status(first.id) == "pending" and store.pending_count() == 1
    assert not os.path.exists(store.log_path(first.id))
    assert [t.id for t in store.newest_page(None, 10)[0]] == [first.id]
    store.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_follower_and_a_waiter_of_a_superseded_task_see_its_end(tmp_path, daemons):
    add_script(tmp_path, "deploy", "run", UNTIL_GO)
    (tmp_path / "scripts.d" / "deploy" / ".task.ini").write_text("[task]\nsupersede = branch\n")
    d = daemons()
    d.submit("deploy", branch="dev")
    old = d.submit("deploy", branch="main", n="1")
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=DEADLINE_S)
    conn.request("GET", f"/tasks/{old}/log?follow=1")
    follow = conn.getresponse()
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(waiting(d, "GET", f"/tasks/{old}", 60)))
    start_requests(d, [waiter], kept_open=1)  # the follow
    new = d.submit("deploy", branch="main", n="2")
    assert follow.read().decode() == f"Superseded by {new}.\n"  # and the stream has ended
    waiter.join(DEADLINE_S)
    (resp, took), = answers
    assert resp.status == 424 and took < 5 and f"Superseded by {new}." in resp.text
    (tmp_path / "go").touch()


# A .on-finish that says what it was told, and notes in $GO.order when it ran.
ON_FINISH = ('echo "status=$TASKTRAIN_STATUS code=$TASKTRAIN_EXIT_CODE id=$TASKTRAIN_TASK_ID '
             'args=$* stdin=$(cat)"\necho "finish $TASKTRAIN_TASK_ID" >> "$GO.order"\n')
RUN_NOTED = 'echo "run $TASKTRAIN_TASK_ID" >> "$GO.order"\n'


@pytest.fixture(scope="module")
def finish_daemon(tmp_path_factory):
    """One daemon whose tasks each have a .on-finish: good, bad, slow (times out),
    held (waits for $GO, to be cancelled), stuck (its .on-finish hangs)."""
    root = tmp_path_factory.mktemp("finish")
    for task, script in (("good", "exit 0\n"), ("bad", "exit 3\n"), ("slow", "sleep 30\n"),
                         ("held", "echo started\n" + UNTIL_GO), ("stuck", "exit 0\n")):
        add_script(root, task, "run", RUN_NOTED + script)
        add_script(root, task, ".on-finish", ON_FINISH + ("exit 5\n" if task == "good" else ""))
    add_script(root, "stuck", ".on-finish", "echo started; sleep 30\n")
    for task in ("slow", "stuck"):
        (root / "scripts.d" / task / ".task.ini").write_text("[task]\ntimeout = 0.2\n")
    d = Daemon(root, "--grace", "0.2", env={"GO": str(root / "go")})
    yield d
    d.stop()


@pytest.mark.parametrize("task, status, code", [
    ("good", "complete", "0"),     # its .on-finish exits 5: the task stays complete
    ("bad", "failed", "3"),
    ("slow", "failed", "143"),     # timed out
    ("held", "cancelled", "143"),  # cancelled while running
])
def test_on_finish_runs_after_every_started_task_whatever_its_end(finish_daemon, task,
                                                                  status, code):
    d = finish_daemon
    task_id = d.submit(task, body=b"the body", headers={"Content-Type": "text/plain"}, k="v")
    if task == "held":
        wait_for(lambda: "started" in d.log(task_id))
        assert d.request("DELETE", f"/tasks/{task_id}").status == 200
    record = d.wait_status(task_id)
    assert record["status"] == status and record["exit_code"] == int(code)
    head, _, tail = record["output"].partition(
        f"on-finish (task {status}, exit code {code}): {d.scripts}/{task}/.on-finish "
        f"--name={task} --k=v\n")
    assert head and tail == (f"status={status} code={code} id={task_id} args=--name={task} "
                             f"--k=v stdin=the body\nexit code: {5 if task == 'good' else 0}\n\n")


def test_on_finish_runs_before_the_next_task_starts(finish_daemon):
    d = finish_daemon
    first, second = d.submit("good", n="1"), d.submit("bad", n="2")
    d.wait_status(second)
    order = [line for line in (d.root / "go.order").read_text().splitlines()
             if line.split()[1] in (first, second)]
    assert order == [f"run {first}", f"finish {first}", f"run {second}", f"finish {second}"]


def test_on_finish_is_bounded_by_the_tasks_timeout(finish_daemon):
    record = finish_daemon.wait_status(finish_daemon.submit("stuck"))
    assert record["status"] == "complete"
    assert record["output"].endswith(
        "started\nexit code: 143\non-finish timed out after 0.2 s.\n\n")


def test_what_an_on_finish_leaves_running_is_stopped_and_said_after_its_exit_code(tmp_path,
                                                                                  daemons):
    add_script(tmp_path, "deploy", "run", "exit 0\n")
    add_script(tmp_path, "deploy", ".on-finish", "sleep 300 &\necho reported\n")
    d = daemons("--grace", "0.2")
    record = d.wait_status(d.submit("deploy"))
    assert record["output"].endswith("reported\nexit code: 0\nStopped 1 process left running "
                                     "by its .on-finish.\n\n")


def test_a_cancel_while_on_finish_runs_leaves_the_task_as_it_ended(tmp_path, daemons):
    add_script(tmp_path, "deploy", "run", "exit 0\n")
    add_script(tmp_path, "deploy", ".on-finish", "echo reporting\n" + UNTIL_GO + "echo reported\n")
    d = daemons("--grace", "0.2")
    task_id = d.submit("deploy")
    wait_for(lambda: "reporting" in d.log(task_id))
    started = time.monotonic()
    resp = d.request("DELETE", f"/tasks/{task_id}")  # .on-finish waits for $GO meanwhile
    assert resp.status == 409 and time.monotonic() - started < 2
    assert "already finished (complete)" in resp.text and ".on-finish" in resp.text
    (tmp_path / "go").touch()
    assert d.wait_status(task_id)["status"] == "complete"
    assert d.log(task_id).endswith("reporting\nreported\nexit code: 0\n\n")
    assert d.request("DELETE", f"/tasks/{task_id}").status == 409


def test_a_cancel_whose_on_finish_outlasts_the_stop_wait_is_a_202(tmp_path, monkeypatch,
                                                                    capfd):
    """Not a 503 saying the store cannot be written: the cancel did its work, and the
    answer is the record as it stands, as a wait's 202 is."""
    go = tmp_path / "go"
    add_script(tmp_path, "deploy", "run", "echo started\n" + UNTIL_GO.replace("$GO", str(go)))
    add_script(tmp_path, "deploy", ".on-finish", f'echo "reporting $TASKTRAIN_STATUS"\n'
               f'until [ -e "{go}.reported" ]; do sleep 0.01; done\n')
    store, runner = start_runner(tmp_path, grace_s=0.2)
    monkeypatch.setattr(runner, "stop_wait_s", lambda: 0.5)  # 2 x --grace + 5 s: too long here
    server = tasktrain.TaskTrainServer(("127.0.0.1", 0), store, runner)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    port = server.server_address[1]
    try:
        for cancel_with in ("curl", "client"):
            task_id = store.submit("deploy", {"by": cancel_with},
                                   on_claimed=runner.hand_over).task.id
            log = tmp_path / "state" / "logs" / f"{task_id}.log"
            wait_for(lambda: log.exists() and "started" in log.read_text())
            if cancel_with == "curl":
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
                conn.request("DELETE", f"/tasks/{task_id}")
                resp = conn.getresponse()
                record = resp.read().decode()  # as it is: its end is not recorded yet
                conn.close()
                assert (resp.status, record_fields(record)["STATUS"]) == (202, "running")
            else:
                code = tasktrain.main(["cancel", "--url", f"http://127.0.0.1:{port}", task_id])
                record = capfd.readouterr().out
                assert code == 0 and record_fields(record)["STATUS"] == "running"
            assert "reporting cancelled" in record
            assert "reporting cancelled" in log.read_text()
            (tmp_path / "go.reported").touch()
            wait_for(lambda: store.status(task_id) == "cancelled")
            (tmp_path / "go.reported").unlink()
    finally:
        server.shutdown()
        server.server_close()
        runner.shutdown("stopped by the test")
        store.close()


def test_a_cancel_while_what_the_scripts_left_is_stopped_is_a_409_that_says_so(tmp_path,
                                                                               daemons):
    add_script(tmp_path, "leaves", "run",
               """sh -c 'trap "" TERM; echo $$ > "$GO.pid"; exec sleep 300' &\n"""
               'while [ ! -s "$GO.pid" ]; do sleep 0.01; done\n')
    d = daemons("--grace", "300")
    task_id = d.submit("leaves")
    stopping = (f"Task {task_id} has already finished (complete); its end is recorded once "
                "what its scripts left running is stopped.\n")
    wait_for(lambda: d.task(task_id)["scripts"])  # its script is over
    # A cancel changes nothing once the scripts are over: asked until the runner is
    # stopping the child (before, it says the end is being recorded).
    answers = []
    wait_for(lambda: answers.append(d.request("DELETE", f"/tasks/{task_id}")) or
             answers[-1].text == stopping)
    assert {(a.status, a.text.split("; ")[0]) for a in answers} == {
        (409, f"Task {task_id} has already finished (complete)")}
    os.kill(int((tmp_path / "go.pid").read_text()), signal.SIGKILL)
    assert d.wait_status(task_id)["status"] == "complete"


def test_on_finish_runs_only_after_a_task_that_started(tmp_path, daemons):
    add_script(tmp_path, "edited", "run", "echo started\n" + UNTIL_GO)
    add_script(tmp_path, "edited", ".on-finish", "sleep 30\n")
    (tmp_path / "scripts.d" / "edited" / ".task.ini").write_text("[task]\ntimeout = 1\n")
    for task in ("lost", "broken"):
        add_script(tmp_path, task, "run", "exit 0\n")
        add_script(tmp_path, task, ".on-finish", 'echo "finish $1" >> "$GO.order"\n')
    d = daemons("--grace", "0.2")
    edited = d.submit("edited")
    wait_for(lambda: "started" in d.log(edited))
    lost, broken = d.submit("lost"), d.submit("broken")
    (tmp_path / "scripts.d" / "lost" / "run").unlink()
    (tmp_path / "scripts.d" / "broken" / ".task.ini").write_text("[task]\nbogus = 1\n")
    # Read once as the task starts: an edit now bounds neither its scripts nor .on-finish.
    (tmp_path / "scripts.d" / "edited" / ".task.ini").write_text("[task]\nbogus = 1\n")
    (tmp_path / "go").touch()
    for task_id in (lost, broken):
        assert d.wait_status(task_id)["status"] == "failed"
        assert "on-finish" not in d.log(task_id)
    assert not (tmp_path / "go.order").exists()
    assert d.log(edited).endswith("exit code: 143\non-finish timed out after 1 s.\n\n")


@pytest.mark.parametrize("during, script, ended", [
    ("scripts", "echo started; sleep 30\n", "task failed, exit code 143"),
    ("on-finish", "exit 0\n", "task complete, exit code 0"),
])
def test_a_stop_still_runs_on_finish_within_the_grace(tmp_path, daemons, during, script, ended):
    add_script(tmp_path, "deploy", "run", script)
    add_script(tmp_path, "deploy", ".on-finish",
               'echo "reporting $TASKTRAIN_STATUS"; trap "" TERM; sleep 30\n')
    d = daemons("--grace", "2")  # what is left of it must still let .on-finish start
    task_id = d.submit("deploy")
    wait_for(lambda: ("started" if during == "scripts" else "reporting") in d.log(task_id))
    started = time.monotonic()
    assert d.signal(signal.SIGTERM) == 0
    assert time.monotonic() - started < 6  # the grace bounds the scripts and .on-finish both
    output = (d.state / "logs" / f"{task_id}.log").read_text()
    assert f"on-finish ({ended}): " in output, output
    assert (f"reporting {ended.split()[1].rstrip(',')}\nexit code: 137\n"
            "on-finish killed: Task Train is stopping, and --grace ran out.\n") in output, output


# ----------------------------------------------------------------------------
# §9 Waiting for the outcome, and the command-line client
# ----------------------------------------------------------------------------

def waiting(d, method, path, seconds, headers=None):
    """Send a request with `Prefer: wait=seconds`; returns (Response, seconds taken)."""
    started = time.monotonic()
    resp = d.request(method, path, headers={"Prefer": f"wait={seconds}", **(headers or {})})
    return resp, time.monotonic() - started


def connection_threads(d):
    """How many connections the daemon is serving: it has a thread for each, beside
    its main thread (which accepts) and its runner (Linux: /proc lists the threads)."""
    return len(os.listdir(f"/proc/{d.proc.pid}/task")) - 2


def start_requests(d, threads, kept_open=0):
    """Start threads that send one request each; return once the daemon serves them.
    `kept_open`: connections the test holds open meanwhile."""
    wait_for(lambda: connection_threads(d) == kept_open,
             message="earlier connections never closed")
    for thread in threads:
        thread.start()
    wait_for(lambda: connection_threads(d) == kept_open + len(threads),
             message="the requests never reached the daemon")


@pytest.fixture(scope="module")
def wait_daemon(tmp_path_factory):
    """One daemon for the wait tests: `good` completes, `bad` fails, and `gated
    gate=X` runs until the test creates the file $GO.X."""
    root = tmp_path_factory.mktemp("wait")
    add_script(root, "good", "run", "echo done\n")
    add_script(root, "bad", "run", "echo broken; exit 3\n")
    add_script(root, "gated", "run", 'echo started\nwhile [ ! -e "$GO.${2#--gate=}" ]; do '
                                     "sleep 0.01; done\n")
    d = Daemon(root, env={"GO": str(root / "go")})
    yield d
    d.stop()


def test_prefer_wait_answers_once_the_task_has_ended(wait_daemon):
    d = wait_daemon
    resp, _ = waiting(d, "POST", "/task?name=good", 30)
    record = record_fields(resp.text)
    assert resp.status == 200 and record["STATUS"] == "complete"
    assert "done\nexit code: 0" in record["RESULTS"]
    assert resp.headers["Preference-Applied"] == "wait=30"
    assert resp.headers["Location"] == "tasks/" + record["ID"]
    resp, _ = waiting(d, "POST", "/task?name=bad", 30, {"Accept": "application/json"})
    assert resp.status == 424 and resp.json()["status"] == "failed"
    assert "broken" in resp.json()["output"]
    resp, _ = waiting(d, "GET", "/tasks/" + resp.json()["id"], 30)
    assert resp.status == 424 and record_fields(resp.text)["STATUS"] == "failed"
    assert waiting(d, "GET", "/tasks/" + record["ID"], 0)[0].status == 200
    assert waiting(d, "GET", "/tasks/0123456789abc", 5)[0].status == 404
    logged = d.stderr()  # refusals, but not the outcome of a task waited for
    assert "/tasks/0123456789abc HTTP/1.1' 404" in logged and "' 424" not in logged


def test_prefer_wait_that_runs_out_answers_202_with_the_record_as_it_stands(wait_daemon):
    d = wait_daemon
    resp, _ = waiting(d, "POST", "/task?name=gated&gate=out", 0)
    task_id = record_fields(resp.text)["ID"]
    assert resp.status == 202 and resp.headers["Preference-Applied"] == "wait=0"
    wait_for(lambda: "started" in d.log(task_id))
    resp, took = waiting(d, "GET", f"/tasks/{task_id}", 1)
    assert resp.status == 202 and 1 <= took < 5
    assert record_fields(resp.text)["STATUS"] == "running" and "started" in resp.text
    (d.root / "go.out").touch()
    assert waiting(d, "GET", f"/tasks/{task_id}", 30)[0].status == 200


def test_a_wait_or_follow_whose_client_has_gone_gives_its_thread_back(wait_daemon):
    d = wait_daemon
    resp, _ = waiting(d, "POST", "/task?name=gated&gate=gone", 0)
    task_id = record_fields(resp.text)["ID"]
    waits = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(10)]
    for conn in waits:
        conn.sendall(f"GET /tasks/{task_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Prefer: wait=3600\r\n\r\n".encode())
    wait_for(lambda: connection_threads(d) == 10)
    time.sleep(1.5 * tasktrain.WAIT_CLIENT_CHECK_S)  # each has looked at its client since
    assert connection_threads(d) == 10
    for conn in waits:  # as a CI step that gave up
        conn.close()
    wait_for(lambda: connection_threads(d) == 0, timeout=5 * tasktrain.WAIT_CLIENT_CHECK_S)
    follows = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(10)]
    for conn in follows:  # of a script that writes nothing more: no chunk to fail to send
        conn.sendall(f"GET /tasks/{task_id}/log?follow=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "\r\n".encode())
    wait_for(lambda: connection_threads(d) == 10)
    for conn in follows:
        conn.close()
    wait_for(lambda: connection_threads(d) == 0, timeout=5 * tasktrain.WAIT_CLIENT_CHECK_S)
    (d.root / "go.gone").touch()
    assert d.wait_status(task_id)["status"] == "complete"


def test_a_waited_answers_status_and_record_come_from_one_reading(tmp_path, monkeypatch):
    # The task ends in the window between the end of the wait and the answer: the
    # window is microseconds wide, so the test widens it, in the store's status().
    go = tmp_path / "go"
    add_script(tmp_path, "gated", "run", f'while [ ! -e "{go}" ]; do sleep 0.01; done\n')
    store, runner = start_runner(tmp_path)
    server = tasktrain.TaskTrainServer(("127.0.0.1", 0), store, runner)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    waited, real_wait, real_status = threading.Event(), runner.wait_finished, store.status

    def wait_finished(*args, **kw):
        try:
            return real_wait(*args, **kw)
        finally:
            waited.set()

    def status(task_id):
        value = real_status(task_id)
        if waited.is_set():  # a reading after the wait: the task ends right after it
            waited.clear()
            go.touch()
            wait_for(lambda: real_status(task_id) == "complete")
        return value

    try:
        task = store.submit("gated", {}, on_claimed=runner.hand_over).task
        wait_for(lambda: store.status(task.id) == "running")
        monkeypatch.setattr(runner, "wait_finished", wait_finished)
        monkeypatch.setattr(store, "status", status)
        conn = http.client.HTTPConnection(*server.server_address, timeout=DEADLINE_S)
        conn.request("GET", f"/tasks/{task.id}", headers={"Prefer": "wait=0"})
        resp = conn.getresponse()
        record = record_fields(resp.read().decode())
        conn.close()
        assert (resp.status, record["STATUS"]) == (202, "running")
    finally:
        go.touch()
        server.shutdown()
        server.server_close()
        runner.shutdown("stopped")
        store.close()


def test_a_follower_of_a_cancelled_pending_task_gets_the_cancel_line(wait_daemon):
    d = wait_daemon
    blocker = d.submit("gated", gate="follow")
    pending = d.submit("gated", gate="never", n="follow")
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=DEADLINE_S)
    conn.request("GET", f"/tasks/{pending}/log?follow=1")
    follow = conn.getresponse()
    assert d.request("DELETE", f"/tasks/{pending}").status == 200
    assert follow.read().decode() == tasktrain.CANCELLED_PENDING + "\n"  # and it has ended
    conn.close()
    (d.root / "go.follow").touch()
    d.wait_status(blocker)


def test_a_cancelled_pending_tasks_line_is_written_before_its_commit(tmp_path, monkeypatch):
    store = tasktrain.TaskStore(str(tmp_path))
    task = store.submit("deploy", {}).task
    release = threading.Event()
    monkeypatch.setattr(tasktrain, "SYNC_DATA", lambda fd: release.wait(DEADLINE_S))
    cancel = threading.Thread(target=store.cancel_pending, args=(task.id,))
    cancel.start()  # its commit is visible at once; its fsync waits for `release`
    wait_for(lambda: store.status(task.id) == "cancelled")
    with open(store.log_path(task.id)) as f:
        assert f.read() == tasktrain.CANCELLED_PENDING + "\n"
    release.set()
    cancel.join(DEADLINE_S)
    store.close()


def test_with_keep_0_a_cancelled_pending_task_is_answered_and_leaves_no_log(tmp_path, daemons):
    add_script(tmp_path, "block", "run", UNTIL_GO)
    d = daemons("--keep", "0")
    blocker, victim = d.submit("block"), d.submit("block", n="2")
    resp = d.request("DELETE", f"/tasks/{victim}")
    assert resp.status == 200 and record_fields(resp.text)["STATUS"] == "cancelled"
    assert d.get(f"/tasks/{victim}").status == 404
    assert os.listdir(d.state / "logs") == [f"{blocker}.log"]
    (tmp_path / "go").touch()
    wait_for(lambda: d.get(f"/tasks/{blocker}").status == 404)


def test_with_keep_0_a_cancelled_running_task_is_answered_as_it_ended(tmp_path, daemons):
    add_script(tmp_path, "block", "run", "echo started\n" + UNTIL_GO)
    d = daemons("--keep", "0", "--grace", "5")
    task_id = d.submit("block")
    wait_for(lambda: "started" in d.log(task_id))
    resp = d.request("DELETE", f"/tasks/{task_id}")
    assert resp.status == 200, resp.text
    assert record_fields(resp.text)["STATUS"] == "cancelled"
    assert d.get(f"/tasks/{task_id}").status == 404


def test_with_keep_0_a_second_cancel_is_a_409_not_a_404(tmp_path, daemons):
    add_script(tmp_path, "block", "run", "echo started\n" + UNTIL_GO)
    d = daemons("--keep", "0", "--grace", "5")
    running, pending = d.submit("block"), d.submit("block", n="2")
    wait_for(lambda: "started" in d.log(running))
    for task_id in (pending, running):
        assert d.request("DELETE", f"/tasks/{task_id}").status == 200
        again = d.request("DELETE", f"/tasks/{task_id}")  # as one that lost a race may come
        assert (again.status, again.text) == (
            409, f"Task {task_id} has already finished (cancelled).\n")


def test_with_keep_0_a_wait_still_gets_the_outcome(tmp_path, daemons, capfd):
    """SPEC 9: an ended task's wait is 200 or 424, though --keep 0 pruned it as it ended."""
    add_script(tmp_path, "good", "run", "echo fine\n")
    add_script(tmp_path, "bad", "run", "exit 3\n")
    d = daemons("--keep", "0")
    for name, status, code in [("good", 200, "complete"), ("bad", 424, "failed")]:
        resp = d.request("POST", f"/task?name={name}", headers={"Prefer": "wait=30"})
        assert (resp.status, record_fields(resp.text)["STATUS"]) == (status, code), resp.text
        task_id = record_fields(resp.text)["ID"]
        assert d.get(f"/tasks/{task_id}").status == 404
        # A wait or a follow that comes once it is gone (as a client's may) still ends.
        late = d.request("GET", f"/tasks/{task_id}", headers={"Prefer": "wait=30"})
        assert (late.status, record_fields(late.text)["STATUS"]) == (status, code)
        follow = d.get(f"/tasks/{task_id}/log?follow=1")
        assert (follow.status, follow.text) == (200, "")  # its output went with its log
    for args, code in [(["good", "--wait"], 0), (["good", "x=1", "--follow"], 0),
                       (["bad", "--follow"], 1)]:
        assert in_process(d, capfd, "submit", *args)[0] == code, args


@pytest.mark.parametrize("ending", ["cancel", "supersede"])
def test_every_commit_that_ends_a_task_wakes_its_waits(tmp_path, ending):
    store = tasktrain.TaskStore(str(tmp_path))
    runner = tasktrain.Runner(store, str(tmp_path), "scripts.d")
    task = store.submit("deploy", {"branch": "main"}).task
    asked, status = threading.Event(), store.status
    store.status = lambda task_id: (asked.set(), status(task_id))[1]
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(runner.wait_finished(task.id, 30)))
    waiter.start()
    assert asked.wait(DEADLINE_S)
    with runner._task_finished:  # taken once the waiter is inside wait(), having looked
        pass
    if ending == "cancel":
        store.cancel_pending(task.id)
    else:
        store.submit("deploy", {"branch": "main", "sha": "2"}, supersede=("branch",))
    waiter.join(5)
    assert waited == [True]
    store.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_cancel_ends_the_waits_for_a_pending_task(wait_daemon):
    d = wait_daemon
    d.submit("gated", gate="cancel")
    pending = d.submit("gated", gate="never")
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(
        waiting(d, "GET", f"/tasks/{pending}", 60)))
    start_requests(d, [waiter])
    assert d.request("DELETE", f"/tasks/{pending}").status == 200
    waiter.join(DEADLINE_S)
    (d.root / "go.cancel").touch()
    (resp, took), = answers
    assert resp.status == 424 and record_fields(resp.text)["STATUS"] == "cancelled" and took < 5


def test_a_waiting_submission_gives_its_body_budget_share_back_once_stored(wait_daemon):
    d, size = wait_daemon, tasktrain.MAX_BODY_BYTES
    answers = []
    waiters = [threading.Thread(target=lambda i=i: answers.append(d.request(
        "POST", f"/task?name=gated&gate=budget&n={i}", b"x" * size,
        {"Prefer": "wait=60", "Content-Type": "application/octet-stream"})))
        for i in range(tasktrain.MAX_BODIES_HELD_BYTES // size)]
    for waiter in waiters:
        waiter.start()
    wait_for(lambda: sum(task["params"].get("gate") == "budget"
                         for task in d.get("/tasks?format=json").json()) == len(waiters))

    def body_admitted():
        with socket.create_connection(("127.0.0.1", d.port), timeout=DEADLINE_S) as s:
            s.sendall(b"POST /task?name=good HTTP/1.1\r\nHost: localhost\r\n"
                      b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % size)
            return s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")

    try:  # all four wait, with the whole budget's worth of bodies sent
        wait_for(body_admitted, timeout=5, message="the waits kept the body budget")
    finally:
        (d.root / "go.budget").touch()
        for waiter in waiters:
            waiter.join(DEADLINE_S)
    assert [resp.status for resp in answers] == [200] * len(waiters)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_stop_ends_every_wait_with_the_record_as_it_is(tmp_path, daemons):
    add_script(tmp_path, "slow", "run", "echo started; sleep 30\n")
    d = daemons("--grace", "5")
    running, pending = d.submit("slow"), d.submit("slow", n="2")
    wait_for(lambda: "started" in d.log(running))
    answers = {}
    waiters = [threading.Thread(target=lambda i=i: answers.update(
        {i: waiting(d, "GET", f"/tasks/{i}", 600)})) for i in (running, pending)]
    start_requests(d, waiters)
    assert d.signal(signal.SIGTERM) == 0
    for waiter in waiters:
        waiter.join(DEADLINE_S)
    assert answers[running][0].status == 424
    assert record_fields(answers[running][0].text)["STATUS"] == "failed"
    assert "Task Train was stopped" in answers[running][0].text
    assert answers[pending][0].status == 202
    assert record_fields(answers[pending][0].text)["STATUS"] == "pending"


@pytest.mark.parametrize("headers, expected", [
    (["wait=5"], 5),
    (["WAIT = 5"], 5),
    (['wait="7"'], 7),
    (["respond-async, wait=10"], 10),
    (["handling=lenient", "wait=2; foo=bar"], 2),
    (["wait=0"], 0),
    (["wait=0007"], 7),
    (["wait=86400"], 3600),
    (["wait=" + "9" * 5000], 3600),
    (["wait=3, wait=9"], 3),      # RFC 7240: only the first instance counts
    (["wait=-1"], None),
    (["wait=1.5"], None),
    (["wait=soon"], None),
    (["wait=", "wait=4"], None),
    (["wait=\u0663"], None),     # an Arabic-Indic three: a digit to Python, not to HTTP
    (["respond-async"], None),
    ([], None),
])
def test_unknown_prefer_tokens_and_bad_waits_are_ignored(headers, expected):
    assert tasktrain.preferred_wait(headers) == expected


def test_a_wait_that_is_not_a_number_answers_as_without_it(client_daemon):
    resp = client_daemon.request("POST", "/task?name=good&n=soon",
                                 headers={"Prefer": "wait=soon"})
    assert resp.status == 201 and "Preference-Applied" not in resp.headers


@pytest.fixture(scope="module")
def client_daemon(tmp_path_factory):
    """One daemon for the client's table: `good` completes, `bad` fails."""
    root = tmp_path_factory.mktemp("client")
    add_script(root, "good", "run", 'echo "good ran $*"\n')
    add_script(root, "bad", "run", "echo bad ran; exit 4\n")
    d = Daemon(root)
    yield d
    d.stop()


def client(d, command, *args, env=None):
    """Run `tasktrain.py COMMAND --url URL ARGS` as a user does; returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k != "TASKTRAIN_TOKEN"} | (env or {})
    return subprocess.run([*PYTHON, TASKTRAIN, command,
                           "--url", f"http://127.0.0.1:{d.port}", *args], env=env,
                          capture_output=True, text=True, timeout=DEADLINE_S)


def closed_port():
    """A loopback port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process(d, capfd, command, *args):
    """Run a client command in this process (quicker than a subprocess); returns
    (exit status, stdout, stderr)."""
    try:
        code = tasktrain.main([command, "--url", f"http://127.0.0.1:{d.port}", *args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


CLIENT_RUNS = [  # (args, exit status, in stdout, in stderr, run as a subprocess)
    (["submit", "good", "k=v"], 0, "STATUS:  pending\n", "", True),
    (["submit", "good", "k=v", "--wait"], 0, "STATUS:  complete\n", " queued.\n", False),
    (["submit", "bad", "--wait"], 1, "STATUS:  failed\n", " queued.\n", False),
    (["submit", "good", "a=b c", "--follow"], 0, "good ran --name=good --a=b c\n", " complete.",
     False),
    (["submit", "--follow", "bad", "x=1"], 1, "bad ran\nexit code: 4\n", " failed.", True),
    (["submit", "nosuch"], 2, "", "No task named 'nosuch'", True),
    (["submit", "good", "novalue"], 2, "", "expected KEY=VALUE, got 'novalue'", True),
    (["submit", "good", "--url", "DEAD"], 3, "", "cannot reach Task Train at http://127.0.0.1:",
     True),
]


@pytest.mark.parametrize("args, code, stdout, stderr, as_subprocess", CLIENT_RUNS)
def test_client_exit_status_says_how_it_went(client_daemon, capfd, args, code, stdout, stderr,
                                             as_subprocess):
    args = [f"http://127.0.0.1:{closed_port()}" if a == "DEAD" else a for a in args]
    if as_subprocess:  # as a hook runs it; the others in this process, which is quicker
        done = client(client_daemon, *args)  # a --url in args comes last, and wins
        done = (done.returncode, done.stdout, done.stderr)
    else:
        done = in_process(client_daemon, capfd, *args)
    assert done[0] == code, done[2]
    assert stdout in done[1] and stderr in done[2]
    if code in (2, 3) and "usage:" not in done[2]:
        assert done[2].count("\n") == 1 and done[1] == ""  # one line says why


@pytest.mark.parametrize("url_first", [["--url", "URL"], ["--url=URL"]])
def test_the_client_takes_its_url_before_its_command_too(client_daemon, capfd, url_first):
    url = f"http://127.0.0.1:{client_daemon.port}"
    args = [a.replace("URL", url) for a in url_first] + ["submit", "good", "k=v", "--wait"]
    assert tasktrain.main(args) == 0
    assert "STATUS:  complete\n" in capfd.readouterr().out


@pytest.mark.parametrize("args, reason", [
    (["submit", "No Name"], "Bad or missing name parameter."),
    (["submit", "good", "bad key=1"], "Bad parameter name 'bad key'"),
    (["submit", "good", "=1"], "expected KEY=VALUE, got '=1'"),
    # the daemon takes the last name it is given: `bad` would run
    (["submit", "good", "name=bad"], "'name=bad': NAME names the task; name cannot be a "
                                     "parameter"),
    (["status", "0123456789abc"], "Not found"),
    (["log", "0123456789abc"], "Not found"),
    (["cancel", "0123456789abc"], "Not found"),
    (["status", "nothex"], "not a task id: 'nothex'"),
    (["submit"], "required: NAME"),
    (["list", "--url", "ftp://example.com"], "--url must be http://"),
    (["list", "--url", "http://127.0.0.1:99999"], "Port out of range"),
    (["list", "--url", "http://me:pw@127.0.0.1:1"], "the token goes in TASKTRAIN_TOKEN"),
    (["lsit"], "no command 'lsit': the commands are submit, status, log, cancel, list"),
])
def test_client_refusals_and_usage_errors_exit_2_saying_why(client_daemon, capfd, args, reason):
    code, out, err = in_process(client_daemon, capfd, *args)
    assert code == 2 and out == "" and reason in err
    assert err.count("\n") == 1 or "usage:" in err


def test_client_shows_lists_and_cancels_tasks(tmp_path, daemons, capfd):
    add_script(tmp_path, "block", "run", "echo started\n" + UNTIL_GO)
    d = daemons()
    run = functools.partial(in_process, d, capfd)
    running = record_fields(run("submit", "block")[1])["ID"]
    pending = record_fields(run("submit", "block", "n=2")[1])["ID"]
    wait_for(lambda: "started" in d.log(running))
    code, listed, _ = run("list")
    assert code == 0
    assert [line.split()[:2] for line in listed.splitlines()] == [
        [pending, "pending"], [running, "running"]]
    assert listed.splitlines()[0].endswith('  block  {"n":"2"}')
    assert run("status", running) == (0, d.get(f"/tasks/{running}").text, "")
    code, out, _ = run("cancel", pending)
    assert code == 0 and record_fields(out)["STATUS"] == "cancelled"
    code, _, err = run("cancel", pending)
    assert code == 2 and "already finished (cancelled)" in err
    assert run("status", pending)[0] == 1
    (tmp_path / "go").touch()
    code, out, err = run("log", running, "--follow")
    assert code == 0 and out == d.log(running) and err == f"Task {running} complete.\n"
    assert run("status", running, "--wait")[0] == 0
    assert run("log", pending) == (0, d.log(pending), "")


def test_client_takes_the_token_from_the_environment(token_daemon, capfd, monkeypatch):
    d = token_daemon
    add_script(d.root, "good", "run", "exit 0\n")
    monkeypatch.delenv("TASKTRAIN_TOKEN", raising=False)
    code, _, err = in_process(d, capfd, "submit", "good")
    assert code == 2 and "Authentication required." in err
    monkeypatch.setenv("TASKTRAIN_TOKEN", "s3cret")
    assert in_process(d, capfd, "submit", "good")[0] == 0


class Impostor(http.server.BaseHTTPRequestHandler):
    """What may answer at a wrong --url: a web server (200, or its 404 page), or a
    proxy in front that cannot reach the daemon (502)."""

    def answer(self):
        body = b"<html><body>Welcome!</body></html>\n" if self.server.status == 200 else b"down\n"
        self.send_response(self.server.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module", params=[200, 404, 502])
def impostor(request):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    server.status, server.port = request.param, server.server_address[1]
    # The client may leave before an answer is written (a follow's wait): not the test's
    # stderr's business.
    server.handle_error = lambda request, client_address: None
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("args", [
    ["submit", "good"], ["submit", "good", "--wait"], ["submit", "good", "--follow"],
    ["status", "0123456789abc"], ["status", "0123456789abc", "--wait"],
    ["cancel", "0123456789abc"], ["list"], ["log", "0123456789abc"],
    ["log", "0123456789abc", "--follow"],
])
def test_the_client_exits_3_when_what_answers_at_its_url_is_not_task_train(impostor, capfd,
                                                                         args):
    code, out, err = in_process(impostor, capfd, *args)
    assert (code, out) == (3, ""), err  # never 0: a CI step would take it for a deploy
    assert ("502 Bad Gateway" if impostor.status == 502 else "is not Task Train") in err
    assert err.count("\n") == 1


def test_a_wait_that_a_proxy_gave_up_on_is_asked_again(wait_daemon, capfd):
    d = wait_daemon
    task_id = d.submit("good")
    asked = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        """A proxy whose read timeout is shorter than a wait: a 504 the first time."""

        def do_GET(self):
            asked.append(self.path)
            resp = d.request("GET", self.path, headers=dict(self.headers)) if len(asked) > 1 \
                else Response(504, {}, b"<html>Gateway Time-out</html>\n")
            self.send_response(resp.status)
            for name, value in resp.headers.items():  # as nginx passes them on
                if name not in ("Content-Length", "Transfer-Encoding", "Connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            self.wfile.write(resp.body)

        def log_message(self, *args):
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    proxy.port = proxy.server_address[1]  # as in_process reads a daemon's
    proxy.handle_error = lambda request, client_address: None
    threading.Thread(target=proxy.serve_forever, args=(0.05,), daemon=True).start()
    try:
        code, out, _ = in_process(proxy, capfd, "status", task_id, "--wait")
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert (code, record_fields(out)["STATUS"], len(asked)) == (0, "complete", 2)


@pytest.mark.parametrize("command, status", [
    ("log {id}", 0),
    ("submit big --follow", 1),  # the reader stopped; the client still says how it went
])
def test_a_reader_that_stops_early_changes_no_exit_status(tmp_path, daemons, command, status):
    add_script(tmp_path, "big", "run", "seq 100000; exit 3\n")
    d = daemons()
    big = d.submit("big")
    d.wait_status(big)
    done = subprocess.run(f"{shlex.join([*PYTHON, TASKTRAIN])} {command.format(id=big)} "
                          f"--url http://127.0.0.1:{d.port} | head -c 10; "
                          'echo "status ${PIPESTATUS[0]}" >&2', shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.stdout == f"{d.scripts}/big/run --name=big\n"[:10]
    assert done.stderr.endswith(f"status {status}\n") and "Traceback" not in done.stderr


def test_the_client_writes_what_its_terminal_cannot_show_as_question_marks(tmp_path, daemons):
    add_script(tmp_path, "cafe", "run", "echo café\n")
    d = daemons()
    cafe = d.submit("cafe")
    d.wait_status(cafe)
    done = client(d, "status", cafe, env={"PYTHONIOENCODING": "ascii"})
    assert (done.returncode, done.stderr) == (0, "")
    assert "caf?\n" in done.stdout


@pytest.mark.parametrize("args", [
    ["status", "0123456789abc", "--wait"],
    ["log", "0123456789abc", "--follow"],
    ["submit", "good", "--follow"],
    ["list"],
])
def test_client_refused_by_the_daemon_exits_2_with_its_one_line_reason(
        token_daemon, capfd, monkeypatch, args):
    monkeypatch.delenv("TASKTRAIN_TOKEN", raising=False)
    assert in_process(token_daemon, capfd, *args) == (
        2, "", f"tasktrain.py {args[0]}: Authentication required.\n")


# ----------------------------------------------------------------------------
# §10 Boundaries a deploy daemon must hold
# ----------------------------------------------------------------------------

OWN = "127.0.0.1:{port}"  # the Host header http.client sends, and so the daemon's own origin


@pytest.mark.parametrize("method, path, headers, status", [
    ("POST", "/task?name=x!", {"Sec-Fetch-Site": "cross-site"}, 403),
    ("POST", "/task?name=x!", {"Sec-Fetch-Site": "same-site"}, 403),
    ("POST", "/task?name=x!", {"Sec-Fetch-Site": "same-origin"}, 400),
    ("POST", "/task?name=x!", {"Sec-Fetch-Site": "none"}, 400),  # typed by the user
    ("POST", "/task?name=x!", {"Origin": "http://evil.example"}, 403),
    ("POST", "/task?name=x!", {"Origin": "null"}, 403),  # a sandboxed frame, a file:// page
    ("POST", "/task?name=x!", {"Origin": "http://" + OWN}, 400),  # an older browser
    ("POST", "/task?name=x!", {"Origin": "http://127.0.0.1:1"}, 403),  # another local site
    ("POST", "/task?name=x!", {"Origin": "http://[::1"}, 403),  # no origin at all
    ("POST", "/task?name=x!", {"Origin": "http://" + OWN + "/x"}, 403),
    # Behind a TLS proxy the Origin is https://; Fetch Metadata decides where it is sent.
    ("POST", "/task?name=x!", {"Sec-Fetch-Site": "same-origin",
                               "Origin": "https://example.com"}, 400),
    ("DELETE", "/tasks/0123456789abc", {"Sec-Fetch-Site": "cross-site"}, 403),
    ("DELETE", "/tasks/0123456789abc", {"Origin": "http://evil.example"}, 403),
    ("DELETE", "/tasks/0123456789abc", {"Sec-Fetch-Site": "same-origin",  # the own page's
                                        "Origin": "http://" + OWN}, 404),  # Cancel button
    ("GET", "/tasks/0123456789abc", {"Sec-Fetch-Site": "cross-site"}, 404),  # a link
])
def test_a_cross_site_post_or_delete_from_a_browser_is_403(idle_daemon, method, path,
                                                           headers, status):
    headers = {k: v.format(port=idle_daemon.port) for k, v in headers.items()}
    resp = idle_daemon.request(method, path, headers=headers)
    assert resp.status == status, resp.text
    if status == 403:
        assert resp.text.startswith("Cross-site request refused") and resp.text.count("\n") == 1


def test_behind_a_proxy_an_older_browsers_origin_may_name_an_allowed_host(tmp_path, daemons):
    """Without Sec-Fetch-Site, the Origin decides; nginx sends its own Host (the
    README's recipe), or the browser's without its port ($host)."""
    d = daemons("--allow-host", "example.com")
    for host, origin, status in [
            (None, "https://example.com", 400), (None, "https://Example.COM:8443", 400),
            ("example.com", "https://example.com:8443", 400),
            (None, "https://evil.example", 403), (None, "https://example.com.evil.example", 403),
            ("example.com", "http://127.0.0.1:1", 403)]:
        headers = {"Origin": origin} | ({"Host": host} if host else {})
        resp = d.request("POST", "/task?name=x!", headers=headers)
        assert resp.status == status, (host, origin, resp.text)


def test_a_host_that_is_not_loopback_the_host_or_allowed_is_403(tmp_path, daemons):
    d = daemons("--allow-host", "tasks.example.com", "--allow-host", "Other.Example")
    for host, status in [
            ("evil.example", 403), ("evil.example:5800", 403), ("127.0.0.1.nip.io", 403),
            ("localhost", 200), ("LocalHost.:5800", 200), ("app.localhost", 200),
            ("127.0.0.2", 200), ("[::1]:5800", 200), ("", 200),
            ("tasks.example.com", 200), ("Tasks.Example.COM:443", 200), ("other.example", 200),
            # no name to check (RFC 9110 7.2: a bad Host value is a 400)
            ("[::1", 400), ("[::1]x", 400), ("..", 400), (":80", 400), ("127.0.0.1:abc", 400),
            ("local host", 400), ("[localhost]", 400), ("[x]:5800", 400)]:
        resp = d.get("/tasks?format=json", headers={"Host": host})
        assert resp.status == status, (host, resp.text)
        if status == 403:
            assert resp.text.count("\n") == 1 and "--allow-host" in resp.text
        if status == 400:
            assert resp.text == (f"Bad host {host!r}: give a name or an address, and perhaps "
                                 "a port.\n")
    http10 = raw_exchange(d.port, b"GET / HTTP/1.0\r\n\r\n")  # no Host at all
    assert http10.startswith(b"HTTP/1.1 200 ")
    twice = raw_exchange(d.port, b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n"
                                 b"\r\n")
    assert twice.startswith(b"HTTP/1.1 400 ")
    # An absolute-form target's host stands for the Host header (RFC 9112 3.2.2).
    for target, host, status in [(b"http://evil.example/tasks", b"localhost", b"403"),
                                 (b"HTTP://127.0.0.1:5800/tasks", b"evil.example", b"200")]:
        answer = raw_exchange(d.port, b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host))
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]


@pytest.mark.parametrize("method, content_type", [
    ("POST", "multipart/form-data; boundary=------------------------d74496d66958873e"),
    ("POST", "Multipart/Mixed; boundary=x"),
    ("GET", "multipart/form-data"),
])
def test_a_multipart_body_is_415_naming_the_accepted_types(idle_daemon, method, content_type):
    body = (b"--------------------------d74496d66958873e\r\n"
            b'Content-Disposition: form-data; name="branch"\r\n\r\nmain\r\n'
            b"--------------------------d74496d66958873e--\r\n")
    resp = idle_daemon.request(method, "/task?name=example" if method == "POST" else "/",
                               body=body, headers={"Content-Type": content_type})
    assert resp.status == 415, resp.text
    assert "application/x-www-form-urlencoded" in resp.text and resp.text.count("\n") == 1


def test_editor_and_package_manager_leftovers_never_run(tmp_path, daemons):
    leftovers = ("run~", "run.bak", "run.orig", "run.swp", "run.dpkg-old", "run.dpkg-dist",
                 "run.rpmnew", "run.rpmsave")
    for name in leftovers + ("run",):
        add_script(tmp_path, "deploy", name, f'echo {name} >> "$GO.ran"\n')
        if name != "run":
            add_script(tmp_path, "stale", name, f'echo {name} >> "$GO.ran"\n')
    d = daemons()
    assert d.wait_status(d.submit("deploy"))["status"] == "complete"
    assert (tmp_path / "go.ran").read_text() == "run\n"
    assert "holds no executable script" in d.submit("stale", expect=404).text


def test_secret_without_token_warns_that_reads_and_cancels_are_open(tmp_path, daemons):
    stderr = daemons("--secret", "hush").stderr()  # with --token too: see the test above
    assert "reads and cancels (GET /tasks..., DELETE /tasks/ID) are open" in stderr
    assert "hush" not in stderr


@pytest.mark.parametrize("accept, content_type", [
    ("TEXT/HTML", "text/html"),  # media types are case-insensitive
    ("text/html;q=0.5, */*;q=0.1", "text/html"),
    ("text/html;q=0", "text/plain"),  # q=0: not acceptable
    ("application/json; q=0.000, text/plain", "text/plain"),
    ("Application/JSON", "application/json"),
    ("application/json-seq", "text/plain"),
])
def test_accept_is_read_as_media_types_with_their_q(daemon, accept, content_type):
    task_id = daemon.submit("example")
    resp = daemon.get(f"/tasks/{task_id}", headers={"Accept": accept})
    assert resp.headers["Content-Type"] == content_type + "; charset=utf-8"
    error = daemon.get("/nope", headers={"Accept": accept})  # a one-line answer alike
    json_asked = content_type == "application/json"
    assert error.headers["Content-Type"] == (tasktrain.JSON if json_asked else tasktrain.TEXT)


def test_a_submission_answers_a_record_even_to_a_browser(tmp_path, daemons):
    add_script(tmp_path, "block", "run", UNTIL_GO)
    d = daemons()
    d.submit("block")  # what follows stays pending, and an identical one finds it
    accept = {"Accept": "text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2"}  # Java's
    new = d.request("POST", "/task?name=block&k=browser", headers=accept)
    same = d.request("POST", "/task?name=block&k=browser", headers=accept)
    (tmp_path / "go").touch()
    assert (new.status, same.status) == (201, 200)
    for resp in (new, same):  # a page's relative links would be /task's, not the task's
        assert resp.headers["Content-Type"] == tasktrain.TEXT and resp.text.startswith("ID: ")


def test_every_answer_varies_with_accept(daemon):
    task_id = daemon.submit("example")
    for method, path in [("GET", "/"), ("GET", "/tasks"), ("GET", "/tasks?format=json"),
                         ("GET", f"/tasks/{task_id}"), ("GET", f"/tasks/{task_id}/log"),
                         ("GET", "/nowhere"), ("POST", "/task?name=x!"),
                         ("DELETE", f"/tasks/{task_id}")]:
        assert daemon.request(method, path).headers["Vary"] == "Accept", (method, path)


def test_a_wrong_gitlab_token_is_bad_not_missing(tmp_path, daemons):
    add_script(tmp_path, "hook", "run", "cat\n")
    d = daemons("--secret", "hush")
    wrong = d.request("POST", "/task?name=hook", headers={"X-Gitlab-Token": "nope"})
    assert (wrong.status, wrong.text) == (401, "Bad X-Gitlab-Token.\n")
    missing = d.request("POST", "/task?name=hook")
    assert (missing.status, missing.text) == (401, "Missing webhook signature.\n")
    d.stop()
    d = daemons("--secret", "hush", "--token", "t0k")  # a hook may send the token instead
    missing = d.request("POST", "/task?name=hook")
    assert (missing.status, missing.text) == (401, "Missing token or webhook signature.\n")
    wrong = d.request("POST", "/task?name=hook", headers={"Authorization": "Bearer nope"})
    assert (wrong.status, wrong.text) == (401, "Bad token, and no webhook signature.\n")


def test_a_missing_interpreter_is_named_in_the_log(tmp_path, daemons):
    add_script(tmp_path, "nointerp", "run", "#!/nonexistent/python9 -u\necho hi\n")
    add_script(tmp_path, "dosline", "run", "#!/bin/sh\r\necho hi\r\n")
    odd = tmp_path / "scripts.d" / "odd"
    odd.mkdir()
    not_utf8 = odd / os.fsdecode(b"b\xffd")
    not_utf8.write_bytes(b"#!/nonexistent/sh\n")
    not_utf8.chmod(0o755)
    d = daemons()
    task = d.wait_status(d.submit("nointerp"))
    assert (task["status"], task["exit_code"]) == ("failed", 127)
    shown = f"{tmp_path}/scripts.d/nointerp/run"  # as the test's --scripts-dir names it
    assert task["output"] == (f"{shown} --name=nointerp\ncannot run {shown}: its interpreter "
                              "'/nonexistent/python9' (from its #! line) was not found\n"
                              "exit code: 127\n\n")
    assert "a Windows line ending" in d.wait_status(d.submit("dosline"))["output"]
    task = d.wait_status(d.submit("odd"))
    assert (task["exit_code"], task["scripts"][0]["exit_code"]) == (127, 127)
    assert f"cannot run {tmp_path}/scripts.d/odd/b\ufffdd: its interpreter" in task["output"]
    assert "Traceback" not in d.stderr()


def test_what_a_tasks_scripts_leave_running_is_stopped_before_the_task_is_recorded(tmp_path,
                                                                                   daemons):
    pids = tmp_path / "go.pids"
    add_script(tmp_path, "leave", "10-plain", f'sleep 300 & echo $! >> "{pids}"\n')
    add_script(tmp_path, "leave", "20-stubborn",
               f"""sh -c 'trap "" TERM; echo $$ >> "{pids}"; exec sleep 300' &\n"""
               f'while [ "$(wc -l < "{pids}")" -lt 2 ]; do sleep 0.01; done\n')
    d = daemons("--grace", "0.1")
    task = d.wait_status(d.submit("leave"))
    assert task["status"] == "complete", task["output"]
    left = [int(pid) for pid in pids.read_text().split()]
    assert all(gone(pid) for pid in left)  # by the time the task was recorded
    assert task["output"].endswith(
        "exit code: 0\n\nStopped 2 processes left running by this task's scripts.\n")


@pytest.mark.skipif(not shutil.which("setsid"), reason="needs the setsid command")
def test_a_process_on_its_way_out_of_the_group_as_the_script_exits_is_let_go(tmp_path,
                                                                           daemons):
    """README: a process started with setsid escapes the end-of-task stop, also when
    the script exits before it has called setsid()."""
    pid = tmp_path / "go.pid"
    add_script(tmp_path, "detach", "run",
               f"""(sleep 0.01; exec setsid sh -c 'echo $$ > "{pid}"; exec sleep 300') """
               ">/dev/null 2>&1 </dev/null &\n")
    d = daemons("--grace", "0.1")
    task = d.wait_status(d.submit("detach"))
    assert task["output"].endswith("exit code: 0\n\n"), task["output"]
    wait_for(lambda: pid.exists() and pid.read_text())
    left = int(pid.read_text())
    try:
        assert not gone(left)
    finally:
        os.kill(left, signal.SIGKILL)


@pytest.mark.skipif(not os.path.exists("/proc/sys/kernel/random/boot_id"),
                    reason="needs Linux's boot id")
@pytest.mark.parametrize("log, boot, status", [
    (None, "same", "pending"),   # claimed; the runner had not opened the log yet
    (b"", "same", "pending"),    # the log opened, no script begun
    ((tasktrain.REQUEUED + "\n").encode(), "same", "pending"),  # put back before
    (b"scripts.d/example/run --name=example\n", "same", "failed"),  # it may have run
    (b"", "another", "failed"),  # after a reboot the log may have lost its lines
    (b"", None, "failed"),       # no boot id was recorded
])
def test_a_task_claimed_but_never_started_before_a_crash_goes_back_to_the_head(tmp_path, log,
                                                                              boot, status):
    store = tasktrain.TaskStore(str(tmp_path))
    claimed = store.submit("example", {"i": "1"}, b"payload").task
    later = store.submit("example", {"i": "2"}).task
    store.start_claiming().synced()
    if log is not None:
        (tmp_path / "logs" / f"{claimed.id}.log").write_bytes(log)
    store.close()  # the daemon dies: the claim is on disk, no end was written
    if boot != "same":
        with contextlib.closing(sqlite3.connect(tmp_path / "tasks.sqlite3")) as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'boot_id'", (boot,))
            db.commit()
    store = tasktrain.TaskStore(str(tmp_path))
    assert store.status(claimed.id) == status
    claim = store.start_claiming()
    if status == "pending":
        assert claim.task.id == claimed.id and claim.task.body == b"payload"
        assert store.position(later.id) == 1
        assert (tmp_path / "logs" / f"{claimed.id}.log").read_text().endswith(
            tasktrain.REQUEUED + "\n")
    else:
        assert claim.task.id == later.id
    store.close()


# A script that writes past the 96 KiB that FULL_DISK lets a file grow to, and exits 0.
FILLS_ITS_LOG = "trap '' XFSZ\nhead -c 200000 /dev/zero 2>/dev/null\nexit 0\n"


def run_on_a_full_disk(tmp_path, daemons, name, scripts):
    """Run task `name`, its scripts a {file name: text} table, to its end in a daemon
    whose files may not grow past 96 KiB; returns the daemon and the task's JSON."""
    for filename, text in scripts.items():
        add_script(tmp_path, name, filename, text)
    d = daemons(wrapper=FULL_DISK)
    return d, d.wait_status(d.submit(name))


@NEEDS_PRLIMIT
def test_a_full_disk_never_makes_a_success_look_like_a_failure(tmp_path, daemons):
    add_script(tmp_path, "quick", "run", "exit 0\n")
    d, task = run_on_a_full_disk(tmp_path, daemons, "fill", {"run": FILLS_ITS_LOG})
    assert (task["status"], task["exit_code"]) == ("complete", 0)
    assert [run["exit_code"] for run in task["scripts"]] == [0]
    assert "Traceback" not in d.stderr()
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    d.wait_status(d.submit("quick"))  # the next task: by then the note has room
    assert d.log(task["id"]).endswith(
        tasktrain.OUTPUT_LOST.format("File too large") + "\n")


@NEEDS_PRLIMIT
def test_a_cancel_whose_end_cannot_be_recorded_is_a_503_not_a_200(tmp_path, daemons):
    add_script(tmp_path, "gate", "run", "echo started\n" + UNTIL_GO)
    d = daemons("--grace", "0.2", wrapper=FULL_DISK)
    gate = d.submit("gate")
    wait_for(lambda: "started" in d.log(gate))
    with contextlib.closing(sqlite3.connect(d.state / "tasks.sqlite3")) as db:
        # Past 96 KiB of write-ahead log, every commit of the daemon's fails.
        db.execute("INSERT INTO meta VALUES ('ballast', ?)", ("x" * 200_000,))
        db.commit()
    resp = d.request("DELETE", f"/tasks/{gate}")
    assert resp.status == 503 and resp.headers["Retry-After"], resp.text
    assert resp.text.count("\n") == 1 and "not recorded yet" in resp.text
    assert d.task(gate)["status"] == "running"  # as the 503 says; recorded once there is room


@NEEDS_PRLIMIT
def test_a_script_whose_command_line_cannot_be_logged_is_not_started(tmp_path, daemons):
    _, task = run_on_a_full_disk(tmp_path, daemons, "two", {
        "1-fill": FILLS_ITS_LOG, "2-next": 'touch "$GO.ran"\n'})
    # Started without its command line in the log, it could pass for never started
    # after a crash, and run again.
    assert (task["status"], task["exit_code"]) == ("failed", None)
    assert [run["exit_code"] for run in task["scripts"]] == [0]
    assert not (tmp_path / "go.ran").exists()


@pytest.mark.parametrize("options, headers, answer", [
    ((), b"", b"201"),
    (("--secret", "hush"), b"X-Hub-Signature-256: sha256=" + b"0" * 64 + b"\r\n", b"401"),
], ids=["unsigned", "fake-signature"])
def test_request_bodies_held_at_once_are_bounded_in_total(tmp_path, daemons, options, headers,
                                                          answer):
    add_script(tmp_path, "hook", "run", "exit 0\n")
    d = daemons(*options)
    size = tasktrain.MAX_BODY_BYTES
    head = (b"POST /task?name=hook HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n" % size
            + headers + b"\r\n")

    def send_head():
        s = socket.create_connection(("127.0.0.1", d.port), timeout=DEADLINE_S)
        s.sendall(head)
        return s

    held = []
    try:
        for _ in range(tasktrain.MAX_BODIES_HELD_BYTES // size):
            held.append(send_head())  # "100 Continue": its share of the budget is taken
            assert held[-1].recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
        refused = raw_exchange(d.port, head)
        assert refused.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: " in refused
        assert refused.split(b"\r\n\r\n", 1)[1].count(b"\n") == 1
        held[0].sendall(b"x" * size)
        assert held[0].recv(100).startswith(b"HTTP/1.1 " + answer)
        held.append(send_head())  # the answered request gave its share back
        assert held[-1].recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
    finally:
        for s in held:
            s.close()


def test_a_client_that_stops_reading_its_answer_is_dropped_after_the_timeout(
        tmp_path, monkeypatch):
    monkeypatch.setattr(tasktrain.Handler, "timeout", 0.3)  # each wait for room to send
    monkeypatch.setattr(tasktrain.Handler, "head_timeout", 0.3)  # and for a next request
    add_script(tmp_path, "loud", "run", "head -c 40000000 /dev/zero\n")  # past the buffers
    store, runner = start_runner(tmp_path)
    server = tasktrain.TaskTrainServer(("127.0.0.1", 0), store, runner)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        task_id = store.submit("loud", {}, on_claimed=runner.hand_over).task.id
        wait_for(lambda: store.status(task_id) == "complete")
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # a window to match
            s.settimeout(DEADLINE_S)
            s.connect(server.server_address)
            s.sendall(f"GET /tasks/{task_id}/log HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            time.sleep(1)  # the client stalls: the daemon's buffers fill, and it gives up
            received = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(1 << 20):
                    received += len(chunk)
        assert 0 < received < 40_000_000  # cut off, and closed: no thread waits for ever
    finally:
        server.shutdown()
        server.server_close()
        runner.shutdown("stopped")


@pytest.mark.parametrize("start, trickle, answer", [
    (b"GET / HTTP/1.1\r\n", b"X-Trickle: 1\r\n", b"HTTP/1.1 408 "),
    # A body that trickled in would hold its share of the body budget for as long.
    (b"POST /task?name=hook HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n",
     b"x", b"HTTP/1.1 408 "),
    (b"GET / HT", b"", b"HTTP/1.1 408 "),  # a request line begun, then nothing
    (b"", b"", b""),  # no request begun: closed without a word
    (b"\r\n", b"", b""),  # an empty line, as may follow a request, is none either
], ids=["head", "body", "request line", "idle", "empty line"])
def test_a_request_head_and_body_must_arrive_within_their_timeout_in_all(
        tmp_path, monkeypatch, caplog, start, trickle, answer):
    caplog.set_level(logging.INFO, logger="tasktrain")  # as the daemon logs
    monkeypatch.setattr(tasktrain.Handler, "head_timeout", 0.3)
    monkeypatch.setattr(tasktrain.Handler, "timeout", 0.3)  # each wait for data
    store, runner = start_runner(tmp_path)
    server = tasktrain.TaskTrainServer(("127.0.0.1", 0), store, runner)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with socket.create_connection(server.server_address, timeout=0.05) as s:
            s.sendall(start)
            started, got = time.monotonic(), None
            while got is None and time.monotonic() - started < 3:
                try:  # a line or byte every 0.05 s: each well within the 0.3 s per wait
                    s.sendall(trickle)
                    got = s.recv(100)
                except socket.timeout:
                    pass
                except ConnectionError:
                    got = b""
            assert got is not None and (got.startswith(answer) if answer else got == b"")
            assert time.monotonic() - started < 2  # at the deadline, not a wait per line
        # A refusal is logged; a connection that sent no request (a browser's spare one)
        # is not worth a line.
        wait_for(lambda: not answer or any(" 408" in r.getMessage() for r in caplog.records))
        assert answer or not [r.getMessage() for r in caplog.records if "timed out" in
                              r.getMessage()]
        budget = server.body_budget  # the body's share is given back
        wait_for(lambda: budget.reserve(budget.total) and budget.release(budget.total) is None)
        with socket.create_connection(server.server_address, timeout=DEADLINE_S) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200 ")  # a head sent at once is fine
    finally:
        server.shutdown()
        server.server_close()
        runner.shutdown("stopped")
        store.close()


def test_the_runners_sync_does_not_queue_behind_an_fsync_begun_before_its_claim(
        tmp_path, monkeypatch):
    store = tasktrain.TaskStore(str(tmp_path))
    first_sync_began, release = threading.Event(), threading.Event()

    def sync_data(fd):  # the first fsync (a submitter's) hangs until released
        if not first_sync_began.is_set():
            first_sync_began.set()
            release.wait(DEADLINE_S)

    monkeypatch.setattr(tasktrain, "SYNC_DATA", sync_data)
    assert store.start_claiming() is None  # the runner is ready
    submitter = threading.Thread(target=lambda: store.submit("deploy", {"n": "1"}).synced())
    submitter.start()
    assert first_sync_began.wait(DEADLINE_S)
    claims = queue.Queue()  # claimed in a commit after that fsync began
    store.submit("deploy", {"n": "2"}, on_claimed=claims.put)
    claim = claims.get(timeout=DEADLINE_S)
    waited = threading.Thread(target=claim.synced)
    waited.start()
    waited.join(DEADLINE_S / 4)
    try:
        assert not waited.is_alive(), "the claim waited for an fsync that cannot cover it"
        assert submitter.is_alive()  # still in that first fsync
    finally:
        release.set()
        submitter.join(DEADLINE_S)
        waited.join(DEADLINE_S)
        store.close()


def test_the_next_tasks_log_is_made_ahead_and_a_log_already_there_is_kept(tmp_path, daemons):
    add_script(tmp_path, "block", "run", UNTIL_GO)
    add_script(tmp_path, "hello", "run", "echo hello\n")
    d = daemons()
    spare = d.state / "spare.log"
    wait_for(spare.exists)  # made while the idle runner waits for work
    blocker = d.submit("block")
    victim, kept = d.submit("hello", n="1"), d.submit("hello", n="2")
    assert d.request("DELETE", f"/tasks/{victim}").status == 200
    (d.state / "logs" / f"{kept}.log").write_text("a line from before its start\n")
    (tmp_path / "go").touch()
    output = d.wait_status(kept)["output"]
    assert output.startswith("a line from before its start\n") and "\nhello\n" in output
    assert d.wait_status(blocker)["status"] == "complete"
    wait_for(spare.exists)  # and again, for the task after
    assert spare.stat().st_size == 0


def test_a_spare_log_removed_by_hand_is_made_again(tmp_path, daemons):
    add_script(tmp_path, "hello", "run", "echo hello\n")
    d = daemons()
    spare = d.state / "spare.log"
    wait_for(spare.exists)
    spare.unlink()
    assert "\nhello\n" in d.wait_status(d.submit("hello"))["output"]
    wait_for(spare.exists)  # for the task after


def test_a_spare_log_left_by_a_crash_never_becomes_a_tasks_log(tmp_path, daemons):
    add_script(tmp_path, "hello", "run", "echo hello\n")
    (tmp_path / "state").mkdir()
    # As a crash between linking the spare into place and unlinking it leaves it.
    (tmp_path / "state" / "spare.log").write_text("another task's output\n")
    d = daemons()
    output = d.wait_status(d.submit("hello"))["output"]
    assert "another task's output" not in output and "\nhello\n" in output
