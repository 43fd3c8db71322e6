#!/usr/bin/env python3
"""Task Train: a sequential script runner with a teensy REST API.

    python3 tasktrain.py [--host 127.0.0.1] [--port 5800] [--scripts-dir DIR] ...

`POST /task?name=NAME&k=v` queues a task; one task at a time, in order of
submission, every executable file in `scripts.d/NAME/` runs as
`SCRIPT --name=NAME --k=v`. Tasks live in SQLite under `--state-dir`, their output
in log files beside it, so an accepted task survives a crash of the daemon.

Security: whoever can reach the port can run the scripts in `scripts.d` with any
arguments. It listens on loopback by default and refuses a public address unless
`--token` is set (or `--insecure` says you know better). Arguments are passed as
an argv list, never through a shell.

Standard library only; Python 3.9 or newer; Linux and macOS. How the threads,
the store's lock, claims and the runner's lock fit together: README.md, "Inside".
"""

__version__ = "1.0.0"

__all__ = ["TaskStore", "Runner", "TaskTrainServer", "Handler", "main"]

import argparse
import ast
import base64
import binascii
import bisect
import codecs
import collections
import configparser
import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import functools
import hashlib
import hmac
import html
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import re
import selectors
import shlex
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import typing
import urllib.parse

# ----------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PORT = 5800
DEFAULT_KEEP = 1000
DEFAULT_GRACE_S = 30.0
STOP_RECORD_MARGIN_S = 5  # beyond the graces of a stop, for its end to be recorded
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")  # the unit of a start time in /proc/PID/stat
LEAVING_GROUP_S = 0.1     # for what a task left in its groups to leave them, before a stop
JOIN_MARGIN_S = 10        # beyond the grace of a daemon stop, for the runner to end

NAME_RE = re.compile(r"[a-z0-9_-]{3,24}")
KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
ID_RE = r"[0-9a-f]{13}"
BAD_PERCENT_RE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
EVENT_RE = re.compile(r"[a-z0-9_]{1,64}")
# An event header as forges send it: `push`, `pull_request`, GitLab's `Tag Push Hook`.
# Checked before event_name folds it: str.split() takes \x1f or \xa0 for a space.
EVENT_HEADER_RE = re.compile(r"[A-Za-z0-9_]+( [A-Za-z0-9_]+)*")
# Seconds as people write them: float() also takes 1_0, 1e3, inf and non-ASCII digits.
SECONDS_RE = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")

MAX_PARAMS = 100
MAX_VALUE_BYTES = 8 * 1024
MAX_BODY_BYTES = 1024 * 1024
# Bodies held at once by all requests together: 300 connections with a fake signature
# and 1 MiB each took the daemon from 30 MB to 350 MB when only each one was bounded.
MAX_BODIES_HELD_BYTES = 4 * 1024 * 1024
BODIES_RETRY_AFTER_S = 5
MAX_PENDING = 10_000
RETRY_AFTER_S = 30
MAX_WAIT_S = 3600  # the longest `Prefer: wait=N` honoured
IDLE_TIMEOUT_S = 30
HEAD_TIMEOUT_S = 30  # for the request line and headers in all, not for each line
FOLLOW_POLL_S = 0.02
# How often a wait for a task's end (Prefer: wait), or a follow, looks whether its
# client has gone: each holds a thread, for as long as an hour (or the task).
WAIT_CLIENT_CHECK_S = 1
# A file whose ctime is this old shows any later change in it: file times are stamped
# once a clock tick (once a second on HFS+, every two on FAT).
SETTLED_NS = 3_000_000_000
STORE_RETRY_S = 1  # while the disk is full, how often the runner tries to record a task's end
ACCEPT_RETRY_S = 0.1  # while the daemon has no file descriptor left, how often it accepts
# Errors that mean no room for a file to grow (a file size limit is one, as for a full
# disk): a task whose log cannot take its first line waits for room instead of failing.
NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_ROOM = "no room"  # an Outcome's status: the task never started, and waits for room
# A submission that wakes the idle runner answers once the task's first script is
# starting, or after this long: the handler and the runner share one interpreter lock,
# and an answer sent before the start, or made after it, held the start back.
HANDED_OVER_WAIT_S = 0.05
ANSWERS_END_S = 1.0  # at a stop, how long answers under way (follows too) get to end
# The longest --timeout, --grace or timeout setting: Python's timers overflow (a thread
# dies, a stop crashes) past threading.TIMEOUT_MAX, ~292 years, and a stop adds graces.
MAX_SECONDS = 10**9
COPY_CHUNK_BYTES = 64 * 1024
# How long, and how much, a closing connection reads of what its client still sends
# (a body refused with 413 goes on arriving).
LINGER_S = 2
LINGER_MAX_BYTES = 16 * 1024 * 1024
WRITE_BUFFER_BYTES = 64 * 1024  # a handler's: most answers leave in one write
HTML_TAIL_BYTES = 256 * 1024
PRUNED_AT_END_KEPT = 100  # with --keep 0, tasks kept in memory as they ended, for waits
CUT_LINE_MAX_BYTES = 4096  # a task page drops a cut first line up to this long (see shown_from)
LIVE_KEEP_CHARS = 1_000_000  # a page that kept a whole 100 MB log froze its tab for 35 s
LIST_REFRESH_S = 3
LIST_PAGE_TASKS = 100
MAX_LIST_PAGE_TASKS = 1000
LIST_PARAMS_CHARS = 200  # of a task's params, in its row of the list
LIST_PARAMS_TOOLTIP_CHARS = 2000  # in that cell's tooltip

LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT
# fdatasync skips the inode's times, as SQLite does; macOS has only fsync.
SYNC_DATA = getattr(os, "fdatasync", os.fsync)
# The WAL is written with zeros this far whenever the store opens (SQLite removes it at
# a clean close): an fdatasync that grows a file writes its inode too, and took 0.25 ms
# here against 0.10 ms for blocks already written. SQLite checkpoints the WAL once it
# holds 1,000 pages (4 KiB and a 24-byte header each, 3.9 MiB), after the commit that
# took it there; it reads a WAL only up to its first invalid frame. With less than
# WAL_ZEROED_MIN_FREE_BYTES free, the zeros would fill a disk that tasks need.
WAL_ZEROED_BYTES = 5 * 1024 * 1024
WAL_ZEROED_MIN_FREE_BYTES = 4 * WAL_ZEROED_BYTES
FINISHED = ("complete", "failed", "cancelled")
SECRET_ENV = ("TASKTRAIN_TOKEN", "TASKTRAIN_SECRET")
FORGE_ENV = ("TASKTRAIN_EVENT", "TASKTRAIN_DELIVERY", "TASKTRAIN_REF", "TASKTRAIN_COMMIT")
ON_FINISH_ENV = ("TASKTRAIN_STATUS", "TASKTRAIN_EXIT_CODE")  # .on-finish's alone
# (event header, delivery header), the forge's own first: Gitea and Forgejo also send
# Gogs's and GitHub's headers, for receivers written for those.
FORGE_HEADERS = (
    ("X-Gitea-Event", "X-Gitea-Delivery"),
    ("X-Gogs-Event", "X-Gogs-Delivery"),
    ("X-Gitlab-Event", "X-Gitlab-Event-UUID"),
    ("X-GitHub-Event", "X-GitHub-Delivery"),
)
DELIVERY_RE = re.compile(r"[\x21-\x7e]{1,128}")
MAX_REF_CHARS = 1024  # a ref or commit goes into the environment, as is
CLIENT_GONE = (ConnectionError, TimeoutError, socket.timeout)  # a client left or stalled
FORM_TYPE = "application/x-www-form-urlencoded"
SIGNATURE_HEADERS = ("X-Hub-Signature-256", "X-Gitea-Signature", "X-Gogs-Signature")
# A request head's limits: a line of 64 KiB, as http.client's, 100 header fields, and
# 64 KiB of them in all (100 lines of 64 KiB held 6.4 MB per connection for 30 s).
MAX_HEAD_LINE_BYTES = 65536
MAX_HEAD_FIELDS = 100
MAX_HEAD_FIELDS_BYTES = 65536
# Empty lines skipped before a request line (RFC 9112 section 2.2: a client may send
# one after a POST's body).
MAX_LEADING_EMPTY_LINES = 8
NOT_CR_OR_LF_RE = re.compile(rb"[^\r\n]")
# A Host value (RFC 9110 section 7.2): an IP literal in brackets, or a registered name
# or IPv4 address, then perhaps a port.
HOST_RE = re.compile(r"(\[[0-9A-Za-z:.%_~-]+\]|[0-9A-Za-z._~%!$&'()*+,;=-]*)(:[0-9]*)?")
# An Origin header that names one (RFC 6454 section 7): scheme://host[:port].
ORIGIN_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#@\s]+)")
HTTP_VERSION_RE = re.compile(r"HTTP/([0-9]{1,10})\.([0-9]{1,10})")
FIELD_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a token (RFC 9110 section 5.1)
# Sec-Fetch-Site values of requests a browser made from this daemon's own pages, or
# that a user typed (Fetch Metadata; Go's net/http CrossOriginProtection).
SAME_SITE_FETCHES = ("same-origin", "none")
# Editor and package-manager leftovers: an Emacs backup `run~` keeps the exec bit.
LEFTOVER_PATTERNS = ("*~", "*.bak", "*.orig", "*.swp", "*.dpkg-*", "*.rpmnew", "*.rpmsave")
LEFTOVER_RE = re.compile("|".join(map(fnmatch.translate, LEFTOVER_PATTERNS)))
TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
JSON = "application/json; charset=utf-8"
# What a `Prefer: wait` answers for a task that has ended. 424 Failed Dependency (RFC
# 4918): the answer depended on the task, and it failed. A 4xx, not a 5xx, because
# `curl --retry` repeats a 5xx answer, and repeating a POST queues the task again.
OUTCOME_STATUS = {"complete": 200, "failed": 424, "cancelled": 424}

SETTINGS_FILE = ".task.ini"
ON_FINISH = ".on-finish"  # run after every task of its folder that started
ON_FINISH_LINE_START = "on-finish (task "  # of the line that begins its part of the log
SETTINGS_KEYS = ("events", "supersede", "timeout")
NOT_FOUND = "Not found"
MISSING_SCRIPTS = "Missing scripts for this task name."
CANCELLED_PENDING = "Task cancelled by request: it never ran."
SUPERSEDED = "Superseded by %s."
CANCELLED_RUNNING = "Task cancelled by request: its scripts were stopped."
# A cancel's 409 for a task whose scripts have ended, by what the runner does now.
ENDED_NOT_RECORDED = {
    "on-finish": "Task {} has already finished ({}); its end is recorded once its "
                 ".on-finish has run.",
    "stopping": "Task {} has already finished ({}); its end is recorded once what its "
                "scripts left running is stopped.",
    None: "Task {} has already finished ({}); its end is being recorded.",
}
RESTARTED = ("Task Train stopped while this task was running; "
             "it was marked failed and not run again.")
RESTARTED_AFTER_SCRIPTS = ("Task Train stopped after this task's scripts had ended, before "
                           "its end was recorded; it keeps the status they earned: {}.")
OUTPUT_LOST = ("Task Train could not write all of this task's output to its log ({}); "
               "some of it is missing above.")
NOT_STARTED = ("Task Train could not write this task's log ({}), so it did not start "
               "the next script: unlogged, a start could not be told from none.")
REQUEUED = ("Task Train stopped before this task's first script started; "
            "it was put back at the head of the queue.")

# The client's exit statuses: what a hook or a CI step acts on.
EXIT_COMPLETE, EXIT_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2, 3
CLIENT_COMMANDS = ("submit", "status", "log", "cancel", "list")
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
CONNECT_TIMEOUT_S = 10
ANSWER_TIMEOUT_S = 60  # for answers that do not wait for a task
# A cancel's answer waits for the stop, 2 x --grace + 5 s at most: an hour covers a
# --grace of up to 29 minutes.
CANCEL_TIMEOUT_S = 3600

log = logging.getLogger("tasktrain")


# ----------------------------------------------------------------------------
# Task model and store (SQLite, one lock)
# ----------------------------------------------------------------------------

# A claim is how a task reaches the runner. Claiming marks the oldest pending task
# running and records it as the one the runner holds (`_held`), so nothing else is
# claimed until its end is written: one task at a time, in order. A claim is made in
# the same transaction as another write whenever one is under way (a submission to an
# idle runner, the end of the task before), so one commit and one fsync serve both.
#
# Commits only reach the WAL; `Claim.synced()` (and a submission's `synced()`)
# returns once the commit is on disk. One thread fsyncs for all: every commit written
# before its fsync began is covered, so concurrent submitters mostly find their work
# done. A 2xx is sent, and a claimed task's first script starts, only after synced().

@dataclasses.dataclass  # not frozen: frozen ones take a fifth of the /tasks page to make
class Task:
    """A snapshot of one task's row; never changed once read.

    Params and script runs stay in their stored JSON until asked for, so that a list
    of thousands of tasks renders without decoding what it does not show.
    """

    id: str
    name: str
    params_json: str        # a JSON object of strings, ASCII-escaped, in submission order
    status: str
    created_us: int
    started_us: "int | None" = None
    finished_us: "int | None" = None
    exit_code: "int | None" = None
    scripts_json: str = "[]"
    event: "str | None" = None      # the forge event that submitted it (push, tag_push ...)
    delivery: "str | None" = None   # the forge's id of that delivery
    ref: "str | None" = None        # the payload's ref
    commit: "str | None" = None     # the payload's commit (after, or GitLab's checkout_sha)
    superseded_by: "str | None" = None  # the task that cancelled it while it was pending
    body: bytes = b""

    @functools.cached_property
    def params(self):
        """The params as a dict, in submission order."""
        return json.loads(self.params_json)

    @functools.cached_property
    def scripts(self):
        """One {path, exit_code, seconds} per script run so far."""
        return json.loads(self.scripts_json)

    @property
    def args(self):
        """The arguments every script of the task gets, in submission order."""
        return ["--name=" + self.name] + [f"--{k}={v}" for k, v in self.params.items()]

    @property
    def finished(self):
        """Whether the task has ended (complete, failed or cancelled)."""
        return self.status in FINISHED


class Claim(typing.NamedTuple):
    """A task claimed for the runner, and how to wait until the claim is on disk."""

    task: Task                  # running, with its body
    synced: typing.Callable     # call before the task's first script starts


class ForgeEvent(typing.NamedTuple):
    """What a forge's webhook delivery says about itself, kept with its task."""

    event: str                  # the event header's value, as sent: `push`, `Push Hook`
    delivery: "str | None"
    ref: "str | None"
    commit: "str | None"


def supersede_values(params, ref, keys):
    """What tasks that supersede each other have in common: their values for `keys`.
    The key `ref` is a forge event's ref, or for other tasks the param `ref`."""
    return tuple(ref if key == "ref" and ref is not None else params.get(key) for key in keys)


class Submitted(typing.NamedTuple):
    """What TaskStore.submit answers."""

    task: Task                  # as queued: pending, even if it already runs
    is_new: bool                # False: an identical task was pending already
    position: "int | None"      # its position in the queue when queued (1 runs next)
    synced: typing.Callable     # returns once the task is on disk (raises if it was
                                # undone): call it first, before answering
    handed_to_runner: "str | None" = None  # the id of the task it handed to the idle runner


class Transaction:
    """One of the store's transactions: its number (they commit in that order), and
    why it was undone, if it was. A write's waiters hold it to learn either."""

    __slots__ = ("number", "error")

    def __init__(self, number):
        self.number = number
        self.error = None


class QueueFull(Exception):
    """More than MAX_PENDING tasks are waiting."""


class StateDirBusy(Exception):
    """Another daemon uses the state dir: two runners would run every task twice."""


def now_us():
    """The wall clock in microseconds since the epoch."""
    return time.time_ns() // 1000


def format_id(us):
    """PHP uniqid(): 8 hex digits of Unix seconds, then 5 of microseconds."""
    return "%08x%05x" % divmod(us, 1_000_000)


def parse_id(task_id):
    """Microseconds since the epoch encoded in a uniqid()-style id."""
    return int(task_id[:8], 16) * 1_000_000 + int(task_id[8:], 16)


def is_leftover(filename):
    """Whether a file name is an editor's backup or a package manager's leftover."""
    return LEFTOVER_RE.match(filename) is not None


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """What scripts.d/NAME/.task.ini says; the defaults when there is none."""

    events: "frozenset | None" = None   # None: every forge event is accepted
    supersede: tuple = ()               # keys: params, or "ref"
    timeout_s: "float | None" = None    # None: --timeout applies; 0: no limit


class SettingsError(Exception):
    """A settings file that cannot be used; str() is the one line naming it."""


def read_task_settings(folder, shown):
    """The task's settings; SettingsError names `shown`/.task.ini and the problem."""
    return read_settings_file(folder, shown)[0]


def read_settings_file(folder, shown):
    """(The task's settings, the stat of the very file read or None if there is none);
    SettingsError names `shown`/.task.ini and the problem."""
    label = os.path.join(shown, SETTINGS_FILE)
    try:
        # utf-8-sig: Windows Notepad starts a UTF-8 file with a byte order mark.
        # O_NONBLOCK: opening a FIFO waits for a writer, and held the runner, and with
        # it cancels and stops, until one came.
        with open(os.path.join(folder, SETTINGS_FILE), encoding="utf-8-sig",
                  opener=lambda path, flags: os.open(path, flags | os.O_NONBLOCK)) as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise SettingsError(f"{label}: it is not a regular file.")
            # Made only for a file that is there: making one costs 54-83 us (timeit), at
            # every submission and every task's start.
            parser = configparser.ConfigParser(interpolation=None, delimiters=("=",),
                                               inline_comment_prefixes=("#", ";"))
            parser.read_file(f, source=label)
    except FileNotFoundError:
        return TaskSettings(), None
    except OSError as e:
        raise SettingsError(f"{label}: cannot read it: {e.strerror}.") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{label}: it is not UTF-8 text.") from None
    except configparser.Error as e:
        raise SettingsError(f"{label}: {settings_syntax_problem(e)}") from None
    try:
        return settings_from(parser), info
    except ValueError as e:
        raise SettingsError(f"{label}: {e}") from None


def settings_syntax_problem(error):
    """A configparser error as one short line (its own messages span several)."""
    if isinstance(error, configparser.MissingSectionHeaderError):
        return f"line {error.lineno}: expected the [task] line first, found {error.line.strip()!r}."
    if isinstance(error, configparser.DuplicateOptionError):
        return f"line {error.lineno}: {error.option!r} is set twice."
    if isinstance(error, configparser.DuplicateSectionError):
        return f"line {error.lineno}: [{error.section}] appears twice."
    if isinstance(error, configparser.ParsingError) and error.errors:
        lineno, line = error.errors[0]
        if line[:1] in ("'", '"') and line[-1:] == line[:1]:  # a repr() before Python 3.13
            line = ast.literal_eval(line)
        return f"line {lineno}: not a 'key = value' line: {line.strip()!r}."
    return " ".join(str(error).split())


def settings_from(parser):
    """TaskSettings from a parsed file; ValueError says what is wrong in it."""
    unknown = [s for s in parser.sections() if s != "task"]
    if parser.defaults():
        unknown.insert(0, parser.default_section)
    if unknown:
        raise ValueError(f"unknown section [{unknown[0]}]: the settings go in [task].")
    if not parser.has_section("task"):
        return TaskSettings()
    task = parser["task"]
    for key in task:
        if key not in SETTINGS_KEYS:
            raise ValueError(f"unknown key {key!r} in [task]: the keys are "
                             + ", ".join(SETTINGS_KEYS) + ".")
    events = task.get("events")
    if events is not None:
        events = frozenset(settings_words(events, "events", EVENT_RE,
                                          "name lowercase events such as push or tag_push"))
    supersede = settings_words(task["supersede"], "supersede", KEY_RE,
                               "name parameters or ref") if "supersede" in task else ()
    return TaskSettings(events, tuple(dict.fromkeys(supersede)),
                        settings_seconds(task["timeout"]) if "timeout" in task else None)


def settings_words(value, key, pattern, hint):
    """The space-separated words of a setting, each matching `pattern`."""
    words = value.split()
    if not words:
        raise ValueError(f"{key} is empty: {hint}, or remove the line.")
    for word in words:
        if not pattern.fullmatch(word):
            raise ValueError(f"{key}: {word!r} will not do: {hint}.")
    return words


def settings_seconds(value):
    """The timeout setting in seconds: a number, 0 or more (0: no limit)."""
    seconds = float(value) if SECONDS_RE.fullmatch(value) else -1.0  # -1: no number
    if not 0 <= seconds < float("inf"):  # inf: more digits than a float holds
        raise ValueError(f"timeout = {value!r} is not a number of seconds (0 or more).")
    if seconds > MAX_SECONDS:
        raise ValueError(f"timeout = {value!r} is more than {MAX_SECONDS} seconds.")
    return seconds


class FolderScan(typing.NamedTuple):
    """What a scan of a task folder found, and the stat of the very folder it listed."""

    info: typing.Optional[os.stat_result]  # None: not asked for, or nothing found
    candidates: tuple                      # (path, is a link) of entries that may be scripts

    def scripts(self, first_only=False):
        """The scripts, sorted: of the candidates, those with an exec bit for us now,
        and for a link, that links to a regular file (a file's own type never changes)."""
        found = []
        for path, is_link in self.candidates:
            if os.access(path, os.X_OK) and (not is_link or os.path.isfile(path)):
                found.append(path)
                if first_only:
                    break
        return found


NOTHING_FOUND = FolderScan(None, ())  # no folder, or one that cannot be read


def scan_folder(folder, with_info=False):
    """A FolderScan of the folder, or NOTHING_FOUND if it cannot be read. `with_info`
    adds the stat of the folder listed, from the same open: a path swapped meanwhile
    to another folder (a symlink a deploy flips) cannot pair one folder's stat with
    the other's entries."""
    try:
        if not with_info:
            return FolderScan(None, script_candidates(folder, folder))
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return FolderScan(os.fstat(fd), script_candidates(fd, folder))
        finally:
            os.close(fd)
    except OSError:
        return NOTHING_FOUND


def script_candidates(listed, folder):
    """(path, is a link) of the entries of `listed` (the folder, or its open fd) that
    may be scripts: not hidden, no editor's or package manager's leftover, a regular
    file or a link; sorted."""
    with os.scandir(listed) as entries:
        return tuple(sorted(
            (os.path.join(folder, entry.name), entry.is_symlink()) for entry in entries
            if not entry.name.startswith(".") and not is_leftover(entry.name)
            and (entry.is_symlink() or entry.is_file(follow_symlinks=False))))


def folder_fields(info):
    """What changes in a folder's stat when an entry comes, goes or is renamed."""
    return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns


def file_fields(info):
    """What changes in a file's stat when it is written or replaced."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def settled(info):
    """Whether a file (or folder) changed long enough ago that any later change shows
    in its stat fields: file times are stamped once a clock tick, or once a second on
    some file systems, so a change made within the same tick as the last one may not."""
    return time.time_ns() - info.st_ctime_ns > SETTLED_NS


class TaskFolders:
    """Whether a task's folder holds a script, and its settings, as each submission
    asks: with a stat of the folder, an access of a script and a stat of .task.ini,
    where a scan of the folder and an open of .task.ini took 6 calls or more. Each
    such call lets go of the interpreter lock, which in a burst of submissions hands
    it to another thread. (The runner scans afresh as each task starts: what runs
    never depends on what is kept here.)

    The folder is scanned again whenever its device, inode, mtime or ctime changed
    (an entry added, removed or renamed, its own mode changed), and the candidates'
    exec bits are looked at each time; .task.ini is read again whenever its device,
    inode, size, mtime or ctime changed. What is kept is keyed by the stat of what was
    read, from the same open. What changed too recently for a later change within the
    same clock tick to show is not kept (git does the same for its racy-clean files),
    nor is a scan that failed.
    """

    def __init__(self, scripts_dir, shown_scripts_dir):
        self.scripts_dir = scripts_dir
        self.shown_scripts_dir = shown_scripts_dir
        # No lock: each maps a task name to an entry replaced whole, never changed, and
        # a thread that overwrites a newer entry with an older one costs one more scan.
        self._scans = {}          # task name -> its folder's FolderScan
        self._settings_read = {}  # task name -> (.task.ini's stat fields, its TaskSettings)

    def scan(self, name):
        """The task folder's FolderScan, made again only if the folder may have changed."""
        folder = os.path.join(self.scripts_dir, name)
        try:
            info = os.stat(folder)
        except OSError:
            return NOTHING_FOUND
        scan = self._scans.get(name)
        if scan is None or folder_fields(scan.info) != folder_fields(info):
            scan = scan_folder(folder, with_info=True)
            if scan is not NOTHING_FOUND and settled(scan.info):
                self._scans[name] = scan
        return scan

    def settings(self, name):
        """The task's TaskSettings; raises SettingsError as read_task_settings does.
        Read again only if the file may have changed. Its stat is not left to the
        folder's times: a settings file that comes must count at once (`events`)."""
        folder = os.path.join(self.scripts_dir, name)
        try:
            info = os.stat(os.path.join(folder, SETTINGS_FILE))
        except FileNotFoundError:
            return TaskSettings()
        except OSError:  # read_task_settings says what is wrong
            info = None
        known = self._settings_read.get(name)
        if info and known and known[0] == file_fields(info):
            return known[1]
        settings, read = read_settings_file(folder, os.path.join(self.shown_scripts_dir, name))
        if read and settled(read):
            self._settings_read[name] = (file_fields(read), settings)
        return settings


def printable(path):
    """A path as text to show: bytes of its name that are not UTF-8 become U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id          TEXT PRIMARY KEY,   -- uniqid(): sorts in submission order
    name        TEXT NOT NULL,
    params      TEXT NOT NULL,      -- JSON object, keys in submission order
    body        BLOB NOT NULL,      -- fed to every script on stdin
    fingerprint TEXT NOT NULL,      -- sha256 of name, params and body
    status      TEXT NOT NULL,
    created_us  INTEGER NOT NULL,
    started_us  INTEGER,
    finished_us INTEGER,
    exit_code   INTEGER,
    scripts     TEXT NOT NULL DEFAULT '[]',
    pgid        INTEGER,            -- process group of the script running now
    event       TEXT,               -- the forge event, delivery, ref and commit, if any
    delivery    TEXT,
    ref         TEXT,
    commit_sha  TEXT,
    webhook_sha256 TEXT,            -- of what the webhook secret alone let in (_webhook_key)
    superseded_by TEXT,             -- the id of the task that cancelled it (supersede)
    on_finish_owed INTEGER NOT NULL DEFAULT 0, -- 1: left running by a crash, .on-finish not done
    ended_status TEXT,              -- how its scripts ended, saved before what follows them
    ended_exit_code INTEGER,
    pgid_start INTEGER,             -- when pgid's leader started (Linux), to know it again
    left_groups TEXT                -- JSON [[pgid, pgid_start], ...]: groups that outlived
                                    -- their script (a restart after a crash stops them too)
);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
# Columns added since the first release, which a database made before them gains on open.
ADDED_COLUMNS = (("event", "TEXT"), ("delivery", "TEXT"), ("ref", "TEXT"),
                 ("commit_sha", "TEXT"), ("webhook_sha256", "TEXT"), ("superseded_by", "TEXT"),
                 ("on_finish_owed", "INTEGER NOT NULL DEFAULT 0"), ("ended_status", "TEXT"),
                 ("ended_exit_code", "INTEGER"), ("pgid_start", "INTEGER"),
                 ("left_groups", "TEXT"))
ADDED_INDEXES = """
CREATE INDEX IF NOT EXISTS tasks_by_webhook ON tasks (webhook_sha256)
    WHERE webhook_sha256 IS NOT NULL;
"""
COLUMNS = ("id, name, params, status, created_us, started_us, finished_us, "
           "exit_code, scripts, event, delivery, ref, commit_sha, superseded_by")
IS_FINISHED_SQL = "status IN (%s)" % ", ".join(f"'{status}'" for status in FINISHED)


def add_missing_columns(db):
    """Give a database made by an older version the columns (and indexes) added since."""
    present = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    for name, declaration in ADDED_COLUMNS:
        if name not in present:
            db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {declaration}")
    db.executescript(ADDED_INDEXES)


class TaskStore:
    """Tasks in SQLite, output in one log file per task, both under the state dir."""

    def __init__(self, state_dir, keep=DEFAULT_KEEP):
        self.keep = keep
        self.log_dir = os.path.join(state_dir, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        # An empty file, open to append, that becomes the next started task's log (see
        # make_spare_log); the runner's alone, which closes it as it stops.
        self._spare_log = os.path.join(state_dir, "spare.log")
        self._spare_fd = None
        self._lock_file = self._lock_state_dir(state_dir)
        # A crash between take_spare_log's link and unlink leaves the spare a task's log.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._spare_log)
        self._db, self._wal_fd = self._open(os.path.join(state_dir, "tasks.sqlite3"))
        # Hold _lock whenever touching _db or the fields below.
        # - _pending holds the ids of pending tasks in submission order, and
        #   _pending_fingerprints maps each of their fingerprints to one of them (two can
        #   share one after stop_claiming); both always agree with the table, as
        #   _finished (the count of finished tasks) does.
        # - _held is the id of the task the runner holds: claimed for it, its end not yet
        #   written, and not let go (release). While it is set nothing else is claimed.
        # - _pruned_at_end holds the last tasks pruned in the commit that ended them
        #   (--keep 0), as they ended, for the waits on them (see ended).
        self._lock = threading.Lock()
        self._held = None
        self._pruned_at_end = collections.OrderedDict()
        self._claiming = False  # True while the runner is ready for tasks
        self._transaction_now = Transaction(0)  # the open one, or the last one begun
        self._committed = 0     # the number of the last transaction committed
        self._synced = 0        # ... and of the last one known to be on disk
        self._syncing_to = []   # per fsync under way: the last transaction it makes durable
        self._synced_changed = threading.Condition(self._lock)
        # Called, without _lock, after every commit that ended a task (a finish, a
        # cancel, a supersede): the runner sets it to wake the waits for an end.
        self.on_ended = lambda: None
        with self._lock:
            crashed, requeued, synced = self._recover()
            last = self._db.execute(  # --keep 0 may have pruned the newest: see _prune
                "SELECT max(id) FROM (SELECT max(id) AS id FROM tasks UNION ALL "
                "SELECT value FROM meta WHERE key = 'last_pruned_id')").fetchone()[0]
            self._last_us = parse_id(last) if last else 0
            self._load_mirrors()
        synced()
        for task_id, line in crashed:
            append_log_line(self.log_path(task_id), line)
        for task_id in requeued:
            append_log_line(self.log_path(task_id), REQUEUED)

    @staticmethod
    def _lock_state_dir(state_dir):
        """The state dir's lock file, locked; StateDirBusy if another daemon holds it."""
        lock_file = open(os.path.join(state_dir, "lock"), "a")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise StateDirBusy(state_dir) from None
        return lock_file

    @staticmethod
    def _open(path):
        """The database, its schema made, and the WAL's file descriptor for _sync (or
        None where SQLite must sync every commit itself)."""
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.executescript(SCHEMA)
        add_missing_columns(db)
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
            db.execute("PRAGMA synchronous=FULL")  # a file system without shared memory
            return db, None
        # Commits only write the WAL; _sync() fsyncs it outside the lock before any
        # answer or script start depends on it, so one fsync covers every commit
        # written before it and submitters never queue behind each other's disk.
        db.execute("PRAGMA synchronous=NORMAL")
        wal_fd = os.open(path + "-wal", os.O_RDWR | os.O_CREAT, 0o644)
        zero_fill(wal_fd, WAL_ZEROED_BYTES)
        return db, wal_fd

    def _recover(self):
        """Put back at the head of the queue the tasks a dead daemon had claimed but
        provably never started, and end the others it left running (failed, unless
        their scripts had ended); returns (id, line for its log) of those ended, the
        ids put back, and the commit's synced(). Expects _lock held.

        Proof needs the same boot: the log then holds every line written before the
        crash (the page cache survived it), and the runner writes a script's command
        line before starting it. Process groups are kept for the runner to stop
        (`orphan_groups`) only on the same boot too: after a reboot a recorded group
        may be someone else's. They are those of the tasks left running, and of those
        whose .on-finish is owed: a daemon that died while it stopped their scripts,
        or ran their .on-finish, left a group behind too.
        """
        crashed = self._db.execute(
            "SELECT id, pgid, ended_status FROM tasks WHERE status = 'running'").fetchall()
        groups = []
        for task_id, pgid, start, left in self._db.execute(
                "SELECT id, pgid, pgid_start, left_groups FROM tasks "
                "WHERE status = 'running' OR on_finish_owed = 1"):
            for group in json.loads(left or "[]") + ([[pgid, start]] if pgid else []):
                if (task_id, *group) not in groups:
                    groups.append((task_id, *group))
        boot_id, last_boot = current_boot_id(), self._db.execute(
            "SELECT value FROM meta WHERE key = 'boot_id'").fetchone()
        same_boot = boot_id is not None and last_boot == (boot_id,)
        self.orphan_groups = groups if same_boot else []  # (task id, group, its leader's start)
        requeued = [task_id for task_id, pgid, _ in crashed if same_boot and pgid is None
                    and never_started(self.log_path(task_id))]
        with self._transaction():
            self._db.executemany("UPDATE tasks SET status = 'pending', started_us = NULL "
                                 "WHERE id = ?", [(task_id,) for task_id in requeued])
            # Its .on-finish is owed, and the body stays for it, until the runner has
            # seen to it (Runner._finish_crashed): a daemon that dies first owes it too.
            # One whose scripts had ended keeps the status they earned (SPEC 8: what
            # follows them never changes it).
            self._db.execute("UPDATE tasks SET status = coalesce(ended_status, 'failed'), "
                             "exit_code = ended_exit_code, finished_us = ?, on_finish_owed = 1 "
                             "WHERE status = 'running'", (now_us(),))
            if not same_boot:
                self._db.execute("UPDATE tasks SET pgid = NULL, pgid_start = NULL, "
                                 "left_groups = NULL WHERE on_finish_owed = 1")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('boot_id', ?)", (boot_id,))
        ended = [(task_id, RESTARTED_AFTER_SCRIPTS.format(status) if status else RESTARTED)
                 for task_id, _, status in crashed if task_id not in requeued]
        return ended, requeued, self._synced_so_far()

    def close(self):
        """Close the database and release the state dir."""
        with self._lock:
            if self._db.in_transaction:  # tasks no answer has promised yet: kept all the same
                with contextlib.suppress(sqlite3.Error):
                    self._commit()
            self._db.close()
            if self._wal_fd is not None:
                os.close(self._wal_fd)
        self._lock_file.close()

    def log_path(self, task_id):
        """Where a task's output is."""
        return os.path.join(self.log_dir, task_id + ".log")

    def make_spare_log(self):
        """Create the file the next task to start takes as its log, unless one is ready.
        The runner calls this while it waits (for a script, or for work): creating a
        file took 0.36 ms on ext4 here, linking one into place 0.014 ms, and a task's
        start waits for its log."""
        if self._spare_fd is None:
            # O_EXCL: a spare.log still there is some task's log (its unlink failed).
            with contextlib.suppress(OSError):  # a full disk: the task makes its own
                self._spare_fd = os.open(self._spare_log, LOG_FLAGS | os.O_EXCL, 0o666)

    def take_spare_log(self, task_id):
        """The log of a task about to start, open to append: the spare file linked into
        place. A task that already has a log (lines written while it was pending)
        keeps it, and the spare waits for the next."""
        path = self.log_path(task_id)
        if self._spare_fd is not None:
            try:
                os.link(self._spare_log, path)
            except OSError as e:  # a log already; else no logs folder, or no spare.log
                if e.errno != errno.EEXIST:
                    self.drop_spare_log()
            else:
                fd, self._spare_fd = self._spare_fd, None
                with contextlib.suppress(OSError):  # if it stays, make_spare_log leaves it
                    os.unlink(self._spare_log)
                return fd
        return open_log_to_append(path)

    def drop_spare_log(self):
        """Close the spare log and remove its file, if there is one."""
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
            with contextlib.suppress(OSError):
                os.unlink(self._spare_log)

    # -- helpers that expect _lock held --

    def _load_mirrors(self):
        """Read the pending queue and the finished count from the table."""
        pending = self._db.execute(
            "SELECT id, fingerprint FROM tasks WHERE status = 'pending' ORDER BY id").fetchall()
        self._pending = [task_id for task_id, _ in pending]
        self._pending_fingerprints = {fp: task_id for task_id, fp in pending}
        self._finished = self._db.execute(
            f"SELECT count(*) FROM tasks WHERE {IS_FINISHED_SQL}").fetchone()[0]

    @contextlib.contextmanager
    def _transaction(self, commit=True):
        """Writes in the open transaction (begun if none is), committed at the end;
        if anything fails, the whole transaction is undone (_roll_back). Follow it
        with _synced_so_far().

        With commit=False it stays open, and the first _sync that needs it commits
        it: the submissions that come in meanwhile join it, and a burst's tasks cost
        one commit, not one each (BEGIN, INSERT, COMMIT were the largest part of a
        submission's CPU). Only a new pending task is left so, whose undoing touches
        nothing but the table and its mirrors.
        """
        held = self._held
        if not self._db.in_transaction:
            self._db.execute("BEGIN")
            self._transaction_now = Transaction(self._transaction_now.number + 1)
        try:
            yield
            if commit:
                self._commit()
        except BaseException as e:
            self._roll_back(held, e)
            raise

    def _commit(self):
        """Commit the open transaction."""
        self._db.execute("COMMIT")
        self._committed = self._transaction_now.number

    def _roll_back(self, held, error):
        """Undo the open transaction, every write that joined it: the runner holds
        what it held before (`held`), the mirrors are read again, and the writes'
        waiters learn why."""
        if self._db.in_transaction:  # a full disk makes SQLite roll back by itself
            self._db.execute("ROLLBACK")
        if self._committed < self._transaction_now.number:
            self._transaction_now.error = str(error) or type(error).__name__
            self._synced_changed.notify_all()
        self._held = held
        self._load_mirrors()

    def _synced_so_far(self, by_runner=False):
        """A function that returns once every write made so far is on disk, or raises
        sqlite3.OperationalError if it was undone; `by_runner`: the runner waits on
        it, to start or end a task (see _sync)."""
        return functools.partial(self._sync, self._transaction_now, by_runner)

    def _next_us(self):
        """The clock in microseconds, bumped so that ids never repeat and always increase."""
        self._last_us = max(now_us(), self._last_us + 1)
        return self._last_us

    def _row(self, task_id, columns=COLUMNS):
        """One task's row, or the given columns of it."""
        return self._db.execute(f"SELECT {columns} FROM tasks WHERE id = ?", (task_id,)).fetchone()

    def _write(self, sql, parameters):
        """Execute one statement and commit it (not synced). Alone it commits itself:
        BEGIN and COMMIT around it took the runner's time while its script started.
        In a transaction that submissions wait in, it commits them too."""
        if not self._db.in_transaction:
            self._db.execute(sql, parameters)
            return
        with self._transaction():
            self._db.execute(sql, parameters)

    def _position(self, task_id):
        """Position in the queue of a pending task (1 runs next), or None."""
        i = bisect.bisect_left(self._pending, task_id)
        return i + 1 if i < len(self._pending) and self._pending[i] == task_id else None

    def _webhook_task_id(self, webhook_key):
        """The id of the kept task submitted with this webhook key, or None."""
        row = self._db.execute("SELECT id FROM tasks WHERE webhook_sha256 = ? LIMIT 1",
                               (webhook_key,)).fetchone()
        return row[0] if row else None

    def _found(self, task_id):
        """A Submitted for a task written before, perhaps by a submitter still waiting
        for its fsync: `synced` waits for that too."""
        return Submitted(task_from_row(self._row(task_id)), False, self._position(task_id),
                         self._synced_so_far())

    def _forget_pending(self, task_id, fingerprint):
        """Take a task off the pending mirrors."""
        del self._pending[bisect.bisect_left(self._pending, task_id)]
        if self._pending_fingerprints.get(fingerprint) == task_id:
            del self._pending_fingerprints[fingerprint]

    def _claim(self):
        """Mark the oldest pending task running for the runner, inside a transaction;
        returns it with its body, or None if none waits, the runner holds one, or it
        has stopped."""
        if self._held or not self._claiming or not self._pending:
            return None
        *row, body, fingerprint = self._row(self._pending[0], COLUMNS + ", body, fingerprint")
        task = task_from_row(row)
        started_us = now_us()
        self._held = task.id
        self._db.execute("UPDATE tasks SET status = 'running', started_us = ? WHERE id = ?",
                         (started_us, task.id))
        self._forget_pending(task.id, fingerprint)
        return dataclasses.replace(task, status="running", started_us=started_us, body=body)

    def _finish(self, task_id, status, exit_code=None, runs=()):
        """Write how a task ended, count it and prune, inside a transaction; returns
        the ids pruned. Its body is dropped: only its scripts ever read it."""
        self._db.execute(
            "UPDATE tasks SET status = ?, exit_code = ?, scripts = ?, finished_us = ?, "
            "body = x'' WHERE id = ?",
            (status, exit_code, json.dumps(list(runs)), now_us(), task_id))
        self._finished += 1
        if self.keep == 0:
            self._pruned_at_end[task_id] = task_from_row(self._row(task_id))
            while len(self._pruned_at_end) > PRUNED_AT_END_KEPT:
                self._pruned_at_end.popitem(last=False)
        return self._prune()

    def _prune(self):
        """Delete the oldest finished tasks beyond `keep`; returns their ids."""
        extra = self._finished - self.keep
        if extra <= 0:
            return []
        old = [r[0] for r in self._db.execute(  # one whose .on-finish is owed waits for it
            f"SELECT id FROM tasks WHERE {IS_FINISHED_SQL} AND on_finish_owed = 0 "
            "ORDER BY id LIMIT ?", (extra,))]
        self._db.executemany("DELETE FROM tasks WHERE id = ?", [(i,) for i in old])
        # The newest id may go (--keep 0, or an owed task kept instead): unless a newer
        # one stays pending, the next start must learn it, to pass it.
        if old and not (self._pending and self._pending[-1] > old[-1]):
            self._db.execute(
                "INSERT OR REPLACE INTO meta SELECT 'last_pruned_id', max(?, coalesce(("
                "SELECT value FROM meta WHERE key = 'last_pruned_id'), ''))", (old[-1],))
        self._finished -= len(old)
        return old

    # -- disk work, done outside _lock --

    def _sync(self, transaction, by_runner=False):
        """Return once `transaction` is committed and on disk; raise
        sqlite3.OperationalError if it was undone.

        An fsync of the WAL makes every commit written before it began durable, so
        one thread syncs for all: the others wait for it and mostly find their work
        done, or commit the transaction that gathered them meanwhile. The runner's
        wait does not queue behind an fsync that began before its commit: it syncs
        at once, beside that one. Behind a burst of submitters it waited 5.4 ms
        (median) for each task's start that way, for a 0.2 ms fsync.
        """
        number = transaction.number
        with self._synced_changed:
            while (self._synced < number and not transaction.error and self._syncing_to
                   and (max(self._syncing_to) >= number or not by_runner)):
                self._synced_changed.wait()
            if transaction.error:
                raise sqlite3.OperationalError(transaction.error)
            if self._committed < number:
                try:
                    self._commit()
                except BaseException as e:
                    self._roll_back(self._held, e)
                    raise
            if self._wal_fd is None or self._synced >= number:
                return
            written = self._committed
            self._syncing_to.append(written)
        synced = False
        try:
            SYNC_DATA(self._wal_fd)
            synced = True
        finally:
            with self._synced_changed:
                self._syncing_to.remove(written)
                if synced:
                    self._synced = max(self._synced, written)
                self._synced_changed.notify_all()

    def _delete_logs(self, task_ids):
        """Delete the logs of pruned tasks."""
        for task_id in task_ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.log_path(task_id))

    # -- the API; each call takes _lock itself --

    def submit(self, name, params, body=b"", on_claimed=None, event=None, webhook_key=None,
               supersede=()):
        """Write a new pending task, or find an identical one; returns a Submitted.

        `event` is the ForgeEvent that submitted it, if one did. Given `webhook_key`
        (see webhook_task), a kept task with the same key is found instead.

        Given `on_claimed`, and if the runner holds no task, the oldest pending one
        (this one, mostly) is claimed in the same commit and handed over with
        `on_claimed(claim)`: one fsync then covers the answer and the start.

        Given `supersede` keys, the pending tasks of the same name with the same
        values for all of them are cancelled in the same commit (latest push wins).

        A plain new task is left in the open transaction for `synced` to commit
        (see _transaction): call it before anything else.
        """
        params_json = json.dumps(params, separators=(",", ":"))
        fingerprint = hashlib.sha256(
            b"\0".join([name.encode(), params_json.encode(), body])).hexdigest()
        event = event or ForgeEvent(None, None, None, None)
        with self._lock:
            same = webhook_key and self._webhook_task_id(webhook_key)
            same = same or self._pending_fingerprints.get(fingerprint)
            if same:
                return self._found(same)
            old = self._same_keys_pending(name, params, event.ref, supersede) if supersede else []
            if len(self._pending) - len(old) >= MAX_PENDING:  # superseding frees places
                raise QueueFull
            us = self._next_us()
            task = Task(format_id(us), name, params_json, "pending", us, body=body,
                        event=event.event, delivery=event.delivery, ref=event.ref,
                        commit=event.commit)
            superseded = [task_id for task_id, _ in old]
            with self._lines_before_commit(superseded, SUPERSEDED % task.id), \
                    self._transaction(commit=False):
                self._db.execute(
                    "INSERT INTO tasks (id, name, params, body, fingerprint, status, created_us, "
                    "event, delivery, ref, commit_sha, webhook_sha256) "
                    "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                    (task.id, name, params_json, body, fingerprint, us, *event, webhook_key))
                pruned = []
                for old_id, old_fingerprint in old:
                    self._forget_pending(old_id, old_fingerprint)
                    self._db.execute("UPDATE tasks SET superseded_by = ? WHERE id = ?",
                                     (task.id, old_id))
                    pruned += self._finish(old_id, "cancelled")
                self._pending.append(task.id)
                self._pending_fingerprints[fingerprint] = task.id
                position = len(self._pending)
                claimed = self._claim() if on_claimed else None
                if claimed or old:  # a start or an end: not left for a sync to commit
                    self._commit()
            synced, runner_synced = self._synced_so_far(), self._synced_so_far(by_runner=True)
        self._delete_logs(pruned)
        if claimed:
            on_claimed(Claim(claimed, runner_synced))
        if old:
            self.on_ended()
        return Submitted(task, True, position, synced, claimed and claimed.id)

    def _same_keys_pending(self, name, params, ref, keys):
        """(id, fingerprint) of the pending tasks of `name` whose values for `keys` are
        those of `params` and `ref` (a key absent from both counts as the same).
        Expects _lock held. A task claimed for the runner is running, so never among them."""
        values = supersede_values(params, ref, keys)
        rows = self._db.execute("SELECT id, params, ref, fingerprint FROM tasks "
                                "WHERE status = 'pending' AND name = ? ORDER BY id", (name,))
        return [(task_id, fingerprint) for task_id, params_json, old_ref, fingerprint in rows
                if supersede_values(json.loads(params_json), old_ref, keys) == values]

    @contextlib.contextmanager
    def _lines_before_commit(self, task_ids, line):
        """Write `line` to each task's log before the commit that ends the tasks, so that
        a follower who sees one ended finds the line, and a log pruned in that commit is
        deleted after it; if the commit fails, the logs are cut back. Expects _lock held."""
        sizes = {}
        for task_id in task_ids:
            path = self.log_path(task_id)
            with contextlib.suppress(FileNotFoundError):
                sizes[task_id] = os.path.getsize(path)
            append_log_line(path, line)
        try:
            yield
        except BaseException:
            for task_id in task_ids:
                with contextlib.suppress(OSError):
                    if task_id in sizes:
                        os.truncate(self.log_path(task_id), sizes[task_id])
                    else:
                        os.unlink(self.log_path(task_id))
            raise

    def webhook_task(self, webhook_key):
        """The kept task (finished ones too) submitted with this webhook key (the sha256
        of a body the webhook secret alone let in), as submit() finds it; or None."""
        with self._lock:
            task_id = self._webhook_task_id(webhook_key)
            return self._found(task_id) if task_id else None

    def get(self, task_id):
        """The task with this id, or None."""
        with self._lock:
            row = self._row(task_id)
        return task_from_row(row) if row else None

    def ended(self, task_id):
        """The task as it stands, or as it ended if --keep 0 pruned it then (a wait for
        it still has an outcome to give), or None."""
        with self._lock:
            row = self._row(task_id)
            return task_from_row(row) if row else self._pruned_at_end.get(task_id)

    def status(self, task_id):
        """Just the status of a task, or None if there is no such task."""
        with self._lock:
            row = self._row(task_id, "status")
        return row[0] if row else None

    def newest_page(self, before=None, limit=LIST_PAGE_TASKS):
        """Up to `limit` tasks older than task `before` (or the newest), newest first,
        without bodies; and whether there are older ones."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM tasks WHERE id < ? ORDER BY id DESC LIMIT ?",
                (before or "g", limit + 1)).fetchall()  # "g" sorts after every id
        return [task_from_row(row) for row in rows[:limit]], len(rows) > limit

    def busy(self):
        """Whether any task is pending or running."""
        with self._lock:
            return bool(self._pending) or self._db.execute(
                "SELECT 1 FROM tasks WHERE status = 'running' LIMIT 1").fetchone() is not None

    def pending_count(self):
        """How many tasks wait to run."""
        with self._lock:
            return len(self._pending)

    def position(self, task_id):
        """Position in the queue of a pending task (1 runs next), or None."""
        with self._lock:
            return self._position(task_id)

    def claim(self):
        """Claim the oldest pending task for the runner, unless it holds one; returns a
        Claim, or None.

        The claim is written at once, its fsync deferred to Claim.synced(), so that an
        fsync another thread starts meanwhile (a submitter's) may cover it too.
        """
        with self._lock:
            with self._transaction():
                task = self._claim()
            return Claim(task, self._synced_so_far(by_runner=True)) if task else None

    def start_claiming(self):
        """Let tasks be claimed: the runner is ready. Returns the oldest pending task's
        Claim, or None."""
        with self._lock:
            self._claiming = True
        return self.claim()

    def stop_claiming(self):
        """Claim nothing more: the runner has stopped. A task claimed for it that it
        never started goes back to the head of the queue, to run after the next start."""
        with self._lock:
            self._claiming = False
        self.put_back()

    def put_back(self):
        """Put the task claimed for the runner, which it never started, back at the head
        of the queue: the runner has stopped, or its log had no room."""
        with self._lock:
            task_id = self._held
            if task_id is None:
                return
            with self._transaction():  # undone, it leaves the task held and running
                self._db.execute("UPDATE tasks SET status = 'pending', started_us = NULL "
                                 "WHERE id = ?", (task_id,))
                bisect.insort(self._pending, task_id)
                self._pending_fingerprints.setdefault(self._row(task_id, "fingerprint")[0],
                                                      task_id)
            self._held = None
            synced = self._synced_so_far()
        synced()

    def release(self, task_id):
        """Let go of a task whose end could not be written, without putting it back in
        the queue: it ran, so it must never run again. It stays running in the table
        until the next start marks it failed."""
        with self._lock:
            if self._held == task_id:
                self._held = None

    def on_finish_owed_tasks(self):
        """The tasks a dead daemon left running (this start's, or an earlier one's) whose
        .on-finish has not been seen to, with their bodies, oldest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {COLUMNS}, body FROM tasks "
                                    "WHERE on_finish_owed = 1 ORDER BY id").fetchall()
        return [dataclasses.replace(task_from_row(row[:-1]), body=row[-1]) for row in rows]

    def orphans_stopped(self):
        """Forget the process groups of the tasks whose .on-finish is owed, once the
        runner has stopped them: a later start must not signal a group whose number
        another process may have taken since (committed, not synced)."""
        self._write_now("UPDATE tasks SET pgid = NULL, pgid_start = NULL, left_groups = NULL "
                        "WHERE on_finish_owed = 1", ())

    def on_finish_done(self, task_id):
        """Note that a crashed task's .on-finish has been seen to, and drop its body,
        which nothing reads any more (committed, not synced)."""
        self._write_now("UPDATE tasks SET body = x'', on_finish_owed = 0 WHERE id = ?",
                        (task_id,))

    def record_process(self, task_id, pgid):
        """Note the process group of a task's script just started, and about when its
        leader started, for a restart after a crash (committed, not synced)."""
        self._write_now("UPDATE tasks SET pgid = ?, pgid_start = ? WHERE id = ?",
                        (pgid, boot_clock_ticks(), task_id))

    def record_left_group(self, task_id, pgid):
        """Note that the group of the task's script that has just exited lives on: a
        restart after a crash stops it too (committed, not synced)."""
        with self._lock:
            recorded, start, left = self._row(task_id, "pgid, pgid_start, left_groups")
            # Its leader has exited: a restart knows the group by its members'
            # environment. The start is kept all the same, so that the restart counts
            # this group once if it is still the one recorded as `pgid`.
            start = start if recorded == pgid else None  # record_process failed: no start
            left = json.dumps(json.loads(left or "[]") + [[pgid, start]])
            self._write("UPDATE tasks SET left_groups = ? WHERE id = ?", (left, task_id))

    def record_scripts_end(self, task_id, outcome):
        """Save how a running task's scripts ended, before what follows them (stopping
        what they left, .on-finish): a restart after a crash then ends the task so
        (committed, not synced)."""
        self._write_now("UPDATE tasks SET scripts = ?, ended_status = ?, ended_exit_code = ? "
                        "WHERE id = ?", (json.dumps(list(outcome.runs)), outcome.status,
                                         outcome.exit_code, task_id))

    def record_scripts(self, task_id, runs):
        """Save the scripts run so far by a running task (committed, not synced)."""
        self._write_now("UPDATE tasks SET scripts = ? WHERE id = ?", (json.dumps(runs), task_id))

    def _write_now(self, sql, parameters):
        """Execute one statement and commit it (not synced): see _write."""
        with self._lock:
            self._write(sql, parameters)

    def finish(self, task_id, status, exit_code, runs, claim_next=False):
        """Record how the held task ended and prune, and let the runner go; with
        claim_next, also claim the next task in the same commit and return its Claim.
        Without one, returns None once the end is on disk."""
        with self._lock:
            with self._transaction():
                pruned = self._finish(task_id, status, exit_code, runs)
                self._held = None  # if the commit fails, the task still holds the runner
                task = self._claim() if claim_next else None
            synced = self._synced_so_far(by_runner=True)
        self._delete_logs(pruned)
        self.on_ended()
        if task is None:
            synced()
            return None
        return Claim(task, synced)

    def cancel_pending(self, task_id):
        """Cancel a task if it is still pending; returns the task as it is afterwards
        (as it ended, if that commit pruned it), or None if there is no such task."""
        with self._lock:
            row = self._row(task_id, COLUMNS + ", fingerprint")
            if not row:
                return None
            *row, fingerprint = row
            task = task_from_row(row)
            if task.status != "pending":
                return task
            with self._lines_before_commit([task_id], CANCELLED_PENDING), self._transaction():
                self._forget_pending(task_id, fingerprint)
                pruned = self._finish(task_id, "cancelled")
            row = self._row(task_id)
            synced = self._synced_so_far()
        synced()
        self._delete_logs(pruned)
        self.on_ended()
        return task_from_row(row) if row else dataclasses.replace(
            task, status="cancelled", finished_us=now_us())


def zero_fill(fd, size):
    """Write zeros from a file's end up to `size` bytes, and sync them (so that the
    file's new size and blocks are on disk before anything waits for a sync of it);
    nothing when the disk has less than WAL_ZEROED_MIN_FREE_BYTES free."""
    free = os.fstatvfs(fd)
    if free.f_bavail * free.f_frsize < WAL_ZEROED_MIN_FREE_BYTES:
        return
    end = os.lseek(fd, 0, os.SEEK_END)
    zeros = bytes(COPY_CHUNK_BYTES)
    with contextlib.suppress(OSError):  # filled meanwhile: as far as it got
        while end < size:
            end += os.pwrite(fd, zeros[:size - end], end)
    SYNC_DATA(fd)


def current_boot_id():
    """This boot's id (Linux), or None where there is no such thing."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def never_started(log_path):
    """Whether a task's log proves that none of its scripts began: it holds no command
    line, nor anything else but notes that the task was put back in the queue."""
    try:
        with open(log_path, "rb") as f:
            head = f.read(COPY_CHUNK_BYTES)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # unreadable: no proof
    *lines, rest = head.split(b"\n")
    return rest == b"" and all(line == REQUEUED.encode() for line in lines)


def log_holds_line(log_path, start):
    """Whether a task's log holds a line that begins with `start` (read in chunks: a
    log may be large)."""
    needle, tail = b"\n" + start.encode(), b"\n"
    with open_log_to_read(log_path) as f:
        for chunk in read_chunks(f):
            if needle in tail + chunk:
                return True
            tail = (tail + chunk)[-len(needle):]
    return False


def task_from_row(row):
    """A Task from a row in COLUMNS order."""
    return Task(*row)


def read_chunks(f):
    """A file's bytes from where it stands to its end, a chunk at a time."""
    return iter(functools.partial(f.read, COPY_CHUNK_BYTES), b"")


def open_log_to_append(path):
    """A task's log, open for appending (a file descriptor); the logs folder is made
    again if someone removed it, so that pending tasks still run."""
    try:
        return os.open(path, LOG_FLAGS, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, LOG_FLAGS, 0o666)


def open_log_to_read(path):
    """Open a task's log for reading; an empty stand-in before the task has one."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return open(os.devnull, "rb")


def append_log_line(path, line):
    """Append one line the daemon says about a task to the task's log; True if it was
    written. A full disk costs the line (the daemon's log says so), nothing else."""
    try:
        fd = open_log_to_append(path)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)
        return True
    except OSError as e:
        log.error("cannot write to %s: %s", path, e.strerror)
        return False


# ----------------------------------------------------------------------------
# Runner thread
# ----------------------------------------------------------------------------

class Outcome(typing.NamedTuple):
    """How a run ended."""

    status: str                 # "pending": no script began, so the task goes back
    exit_code: "int | None" = None
    runs: tuple = ()            # one {path, exit_code, seconds} per script run


class Script(typing.NamedTuple):
    """One of a task's scripts, ready to start."""

    argv: list                  # its path, then the task's arguments
    shown: str                  # its path as the log and the record show it
    line: str                   # its command line as the log shows it, with a newline


class TaskLog:
    """The log a running task's scripts write to, given open to append. The runner's
    own lines go through write(), which a full disk cannot make raise: the first error
    is kept instead, for a note once there is room."""

    def __init__(self, fd):
        self.fd = fd
        self.error = None   # why a write failed, the first time one did
        self.no_room = False  # whether that was for want of room (NO_ROOM_ERRNOS)
        self.cut = 0        # bytes of the text a failed write() left in the log
        self.note = None    # what the log must say about it, once it can

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        with contextlib.suppress(OSError):  # NFS reports late write errors here: no use
            os.close(self.fd)

    def fileno(self):
        """The file descriptor the scripts write to."""
        return self.fd

    def write(self, text):
        """Append the runner's own text; False if not all of it could be written."""
        encoded = text.encode()
        data = memoryview(encoded)
        try:
            while data:
                data = data[os.write(self.fd, data):]
            return True
        except OSError as e:
            self.cut = len(encoded) - len(data)
            if self.error is None:
                self.error, self.no_room = e.strerror, e.errno in NO_ROOM_ERRNOS
            self.note = self.note or OUTPUT_LOST.format(self.error)
            return False


class Runner:
    """The one thread that runs tasks, one at a time, in submission order.

    The store decides which task is next, so the order is the database's, also
    across restarts. An idle runner waits on `handed_over` for a task the store
    claimed for it at a submission; a busy one claims the next task itself as it
    finishes the last.
    """

    def __init__(self, store, scripts_dir, shown_scripts_dir, timeout_s=0,
                 grace_s=DEFAULT_GRACE_S):
        self.store = store
        self.scripts_dir = scripts_dir
        self.shown_scripts_dir = shown_scripts_dir
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.handed_over = queue.Queue()  # Claims, or None: shut down
        self.devnull = os.open(os.devnull, os.O_RDONLY)  # stdin of a task without a body
        # Encoded once: Popen would encode every variable again for every script.
        self.env = {os.fsencode(k): os.fsencode(v)
                    for k, v in os.environ.items()
                    if k not in SECRET_ENV + FORGE_ENV + ON_FINISH_ENV}
        self._thread = threading.Thread(target=self._loop, name="runner", daemon=True)
        store.on_ended = self.task_ended
        # Hold _lock to read or change any of the fields below: the runner, handler
        # threads (cancel, shutdown) and timer threads (timeout) all do.
        # - _stops: task id -> the stop asked for it, (status, line); the first one wins.
        #   A task's start drops every other task's entry (a stop after a task's last
        #   script is too late, and an id is claimed only once).
        # - _process: (task id, Popen) of the script running now, or None.
        # - _started: the id of the last task a script of which is starting (its
        #   command line is in the log) or has started.
        # - _ended: (task id, status) of the last task whose scripts are over.
        # - _finishing: the Popen of the .on-finish running now, or None.
        # - _stopping_left: True while what a task's scripts left running is stopped.
        # - _shutdown: (status, line) once the daemon is stopping, else None.
        # - _stop_deadline: set with _shutdown, when what still runs is killed.
        self._lock = threading.Lock()
        self._stops = {}
        self._process = None
        self._started = None
        self._ended = (None, None)
        self._started_or_ended = threading.Condition(self._lock)  # as _started, _ended change
        self._finishing = None
        self._stopping_left = False
        self._shutdown = None
        self._stop_deadline = None
        self._shutting_down = threading.Event()  # set with _shutdown: cuts a retry's pause short
        self._task_finished = threading.Condition()
        self._unrecorded = None  # under _task_finished: the task whose end cannot be written
        # Runner thread only: task id -> the line its log must still get (a full disk).
        self._notes = {}
        # Runner thread only: the id of the task at the head of the queue that waits for
        # room for its log, or None (logged once per task, not at every try).
        self._waiting_for_room = None
        # Runner thread only: groups of the running task whose script has exited while
        # members it started live on; they are stopped once the task's last script has
        # exited. Those members are the daemon's children once orphaned where it is the
        # reaper (PID 1 of a container), so the runner collects them as they exit.
        self._left_behind = set()

    def start(self):
        """Start the runner thread."""
        self._thread.start()

    def hand_over(self, claim):
        """Give the idle runner a task the store claimed for it."""
        self.handed_over.put(claim)

    def shutdown(self, line):
        """Stop the running task (if any), run no other, and wait for the thread."""
        with self._lock:
            self._shutdown = ("failed", line)
            self._stop_deadline = time.monotonic() + self.grace_s
            self._started_or_ended.notify_all()
            current, finishing = self._process, self._finishing
        self._shutting_down.set()
        if finishing:
            self._kill_later(finishing, self.grace_s)
        self.task_ended()  # waits for pending tasks end now; for the running one, once it has
        if current:
            self._begin_stop(current[1])
        self.handed_over.put(None)
        self._thread.join(self.grace_s + JOIN_MARGIN_S)
        self.task_ended()

    def stop(self, task_id, status, line):
        """Stop a task the store has marked running: it ends with `status` and `line`.
        Returns None if a script of it can still be stopped; else the status its
        scripts ended with (it is stopping what they left, or running .on-finish)."""
        with self._lock:
            if self._ended[0] == task_id:
                return self._ended[1]  # a stop after the last script is too late
            self._stops.setdefault(task_id, (status, line))
            current = self._process
        if current and current[0] == task_id:
            self._begin_stop(current[1])
        return None

    def after_scripts(self, task_id):
        """What the runner does for a task whose scripts have ended: "on-finish",
        "stopping" (what they left running), or None (nothing that takes long)."""
        with self._lock:
            if self._ended[0] != task_id:
                return None
            return ("on-finish" if self._finishing else
                    "stopping" if self._stopping_left else None)

    def scripts_ended(self, task_id):
        """The status the task's scripts ended with, or None if they have not yet."""
        with self._lock:
            return self._ended[1] if self._ended[0] == task_id else None

    def end_unwritable(self, task_id):
        """Whether the task has ended but the store cannot write its end (a full disk)."""
        with self._task_finished:
            return self._unrecorded == task_id

    def stop_wait_s(self):
        """How long a stop may take before the task's end is recorded: a grace for the
        script's group, one for what earlier scripts left, and a margin."""
        return 2 * self.grace_s + STOP_RECORD_MARGIN_S

    def wait_started(self, task_id, timeout_s):
        """Wait until a script of the task is starting, or none will (its scripts are
        over, or the daemon stops), or the timeout."""
        with self._started_or_ended:
            self._started_or_ended.wait_for(
                lambda: task_id in (self._started, self._ended[0]) or self._shutdown, timeout_s)

    def wait_finished(self, task_id, timeout_s, or_unrecorded=False):
        """Wait until the task has finished, or will not in this daemon's life (it is
        stopping), or, with `or_unrecorded`, has ended but its end cannot be written
        (a full disk); False if none of that happened within the timeout."""
        with self._task_finished:
            return self._task_finished.wait_for(
                lambda: or_unrecorded and self._unrecorded == task_id
                or self._wait_over(task_id), timeout_s)

    def task_ended(self):
        """Wake the waits of wait_finished: a task has ended, or the daemon stops."""
        with self._task_finished:
            self._task_finished.notify_all()

    def _wait_over(self, task_id):
        """Whether a wait for the task is over. At a stop, the running task is waited
        for until it is recorded (failed, mostly): answering `running` would let a
        client take a stopped deploy for one still under way."""
        status = self.store.status(task_id)
        if status not in ("pending", "running"):
            return True
        stopping = self._shutting_down.is_set()
        return stopping and (status == "pending" or not self._thread.is_alive())

    # -- stopping a task's scripts --

    def _stop_asked(self, task_id):
        """The stop asked for the task, (status, line), or None."""
        with self._lock:
            return self._stops.get(task_id) or self._shutdown

    def _track(self, task_id, proc):
        """Make `proc` the script a stop reaches (None: no script runs now); returns
        the stop asked for the task, checked in the same breath so none is missed."""
        with self._lock:
            self._process = (task_id, proc) if proc else None
            return self._stops.get(task_id) or self._shutdown

    def _begin_stop(self, proc):
        """SIGTERM to the script's process group; SIGKILL to it after the grace period."""
        signal_group(proc.pid, signal.SIGTERM)
        self._kill_later(proc, self.grace_s)

    @staticmethod
    def _kill_unreaped(proc):
        """SIGKILL a script's group if its leader is not yet reaped: until then its
        pid, and so the group's id, cannot belong to anyone else. Stragglers of a
        reaped leader are _await_group's."""
        if proc.returncode is None:
            signal_group(proc.pid, signal.SIGKILL)

    def _await_group(self, pgid, deadline=None):
        """After a stop: wait for the group's stragglers until `deadline` (default: the
        grace period from now), or a daemon stop's deadline if sooner, then SIGKILL
        what is left."""
        deadline = deadline or time.monotonic() + self.grace_s
        while live_members(pgid) and time.monotonic() < min(deadline, self._stop_by()):
            time.sleep(0.01)
        signal_group(pgid, signal.SIGKILL)
        reap_group(pgid)  # those that died after the last look

    def _stop_by(self):
        """When a daemon stop kills what still runs (one grace after its signal), or inf."""
        with self._lock:
            return math.inf if self._stop_deadline is None else self._stop_deadline

    def _reap_left_behind(self):
        """Collect the members left behind that have exited since; forget empty groups.
        Called between scripts only, so that it never takes a running script's status."""
        for pgid in list(self._left_behind):
            reap_group(pgid)
            if not signal_group(pgid, 0):
                self._left_behind.discard(pgid)

    def _stop_left_behind(self, out, by="this task's scripts"):
        """Stop what the task's scripts (or `by`) left running in their groups, as a
        cancel would, and say how many processes that was: nothing of a task outlives
        it."""
        groups, self._left_behind = self._left_behind, set()
        if not any(map(live_members, groups)):
            return
        # One on its way out of the group (`setsid cmd &`, then the script exits) is
        # let go, as one that left earlier is.
        time.sleep(LEAVING_GROUP_S)
        members = {pgid: live_members(pgid) for pgid in groups}
        members = {pgid: pids for pgid, pids in members.items() if pids}
        if not members:
            return
        with self._lock:
            self._stopping_left = True
        try:
            self._stop_members(members, out, by)
        finally:
            with self._lock:
                self._stopping_left = False

    def _stop_members(self, members, out, by):
        """Stop the processes of each group, {pgid: pids}, and count them in the log,
        saying who left them (`by`)."""
        # Those a SIGKILL already ends (a stop's, sent to .on-finish's group) are not
        # counted, though waited for: the leader is reaped before they next run.
        count = sum(not being_killed(pid) for pids in members.values() for pid in pids)
        for pgid in members:
            signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s  # one for all the groups
        for pgid in members:
            self._await_group(pgid, deadline)
        if count:
            out.write(f"Stopped {count} process{'es' if count != 1 else ''} left running "
                      f"by {by}.\n")

    def _write_notes(self):
        """Write the notes a full disk held back into their tasks' logs, if there is
        room now; a task pruned meanwhile needs none."""
        for task_id, line in list(self._notes.items()):
            if self.store.status(task_id) is None or append_log_line(
                    self.store.log_path(task_id), line):
                del self._notes[task_id]

    def _finish_crashed(self):
        """Run the .on-finish of each task a dead daemon left running, as after any task
        that started (SPEC 8), unless its log shows that it had begun already."""
        for task in self.store.on_finish_owed_tasks():
            if self._shutting_down.is_set():  # still owed: the next start runs it
                return
            log_path = self.store.log_path(task.id)
            try:
                on_finish = self._on_finish_path(task)
                if on_finish and not log_holds_line(log_path, ON_FINISH_LINE_START):
                    with TaskLog(open_log_to_append(log_path)) as out, \
                            stdin_for(task.body, self.devnull) as stdin:
                        env = self._prepare(task, NOTHING_FOUND)[1]
                        outcome = Outcome(task.status, task.exit_code, task.scripts)
                        self._run_on_finish(task, on_finish, outcome, env, stdin, out,
                                            self._timeout(task)[0])
            except OSError as e:
                log.error("task %s: cannot run its .on-finish: %s", task.id, e)
            except Exception:  # the queue must go on all the same
                log.exception("task %s: the runner failed at its .on-finish", task.id)
            with contextlib.suppress(sqlite3.Error):
                self.store.on_finish_done(task.id)

    def _stop_orphans(self):
        """Stop the scripts a crashed daemon left running: one task at a time, even then."""
        for task_id, pgid, leader_start in self.store.orphan_groups:
            if not group_is_tasks(pgid, task_id, leader_start):
                if live_members(pgid):
                    log.warning("process group %d, recorded for task %s, is left alone: "
                                "nothing shows it is still the task's", pgid, task_id)
                continue
            if signal_group(pgid, signal.SIGTERM):
                log.warning("stopping process group %d, left running by a daemon that died", pgid)
                self._await_group(pgid)
        if self.store.orphan_groups:  # each got a SIGKILL at the end of its wait
            with contextlib.suppress(sqlite3.Error):
                self.store.orphans_stopped()

    # -- the loop --

    def _loop(self):
        """Run and finish tasks until the daemon shuts down."""
        # Claims wait until a dead daemon's scripts are stopped, and the .on-finish of
        # the tasks it left running has run: one task at a time.
        self._stop_orphans()
        self._finish_crashed()
        claim = self.store.start_claiming()
        while True:
            if claim is None:
                self.store.make_spare_log()
                claim = self.handed_over.get()
            if claim is None or self._shutting_down.is_set():
                self.store.stop_claiming()  # a claimed task not yet begun goes back
                self.store.drop_spare_log()
                return
            task = claim.task
            outcome = self._run(claim)
            if outcome.status == "pending":  # stop_claiming puts it back in the queue
                claim = None
                continue
            if outcome.status == NO_ROOM:
                claim = self._wait_for_room(claim)
                continue
            self._waiting_for_room = None
            if outcome.status != "complete":
                log.warning("task %s (%s) %s, exit code %s",
                            task.id, task.name, outcome.status, outcome.exit_code)
            claim = self._record_finish(task.id, outcome)  # the store wakes the waits
            with self._task_finished:
                self._unrecorded = None
            self._write_notes()

    def _wait_for_room(self, claim):
        """Put back a task that never started for want of room for its log, at the head
        of the queue, and claim it again in a while; returns the claim to run, or None
        when a submission meanwhile claimed it and hands it over."""
        if self._waiting_for_room != claim.task.id:
            log.error("task %s: no room for its log; it waits at the head of the queue, "
                      "and runs once there is room", claim.task.id)
            self._waiting_for_room = claim.task.id
        try:
            self.store.put_back()
        except sqlite3.Error:  # no room in the store either: undone, it stays claimed
            self._shutting_down.wait(STORE_RETRY_S)
            return claim
        except OSError:  # committed, not synced: put back all the same, claimed below
            pass
        while not self._shutting_down.wait(STORE_RETRY_S):  # a stop cuts it short
            with contextlib.suppress(sqlite3.Error, OSError):  # the store may be full too
                return self.store.claim()
        return None

    def _record_finish(self, task_id, outcome):
        """Record how a task ended, and claim the next in the same commit and fsync;
        returns the next Claim, or None.

        While the store cannot be written (a full disk) it tries again, and nothing
        else is claimed, so the queue goes on in order once there is room. A task
        given up on stays running in the table, and the next start marks it failed.
        """
        tries = 0
        while True:
            try:
                return self.store.finish(task_id, outcome.status, outcome.exit_code,
                                         outcome.runs,
                                         claim_next=not self._shutting_down.is_set())
            except sqlite3.OperationalError as e:  # a full or locked disk: worth another try
                tries += 1
                if tries == 1:  # not once a second while the disk stays full
                    log.error("task %s: cannot record that it ended: %s; trying again "
                              "every %g s", task_id, e, STORE_RETRY_S)
                with self._task_finished:  # a cancel waiting for the end learns it
                    self._unrecorded = task_id
                    self._task_finished.notify_all()
                if self._shutting_down.is_set():
                    break
                self._shutting_down.wait(STORE_RETRY_S)
            except (sqlite3.Error, OSError):  # a bug, or a failed fsync: no use trying again
                log.exception("task %s: the task store failed", task_id)
                break
        self.store.release(task_id)
        return None

    def _run(self, claim):
        """Run a claimed task's scripts; returns its Outcome."""
        task, began = claim.task, False
        with self._lock:
            self._stops = {task.id: self._stops[task.id]} if task.id in self._stops else {}
        self._write_notes()  # a note a full disk held back may fit by now
        try:
            with TaskLog(self.store.take_spare_log(task.id)) as out, \
                    stdin_for(task.body, self.devnull) as stdin:
                scan = scan_folder(os.path.join(self.scripts_dir, task.name))  # afresh
                scripts, env = self._prepare(task, scan)
                timeout_s, problem = self._timeout(task)  # read once: bounds .on-finish too
                claim.synced()  # the first script starts only once the claim is on disk
                with self._lock:
                    never_began = self._shutdown is not None and task.id not in self._stops
                if never_began:
                    return Outcome("pending")
                began = True  # past here, an error no longer shows that nothing started
                outcome = Outcome("failed")
                try:
                    outcome = self._run_scripts(task, scripts, env, stdin, out, timeout_s,
                                                problem)
                    return outcome
                finally:
                    if outcome.status != NO_ROOM:  # it is not over: it waits for room
                        self._scripts_over(task.id, outcome.status)
                    # SPEC 8: .on-finish only after a task that was started.
                    on_finish = self._on_finish_path(task) if outcome.runs else None
                    if outcome.runs and (self._left_behind or on_finish):
                        # A crash in what follows the scripts keeps how they ended.
                        with contextlib.suppress(sqlite3.Error):
                            self.store.record_scripts_end(task.id, outcome)
                    self._stop_left_behind(out)
                    if on_finish:
                        self._run_on_finish(task, on_finish, outcome, env, stdin, out,
                                            timeout_s)
                    if out.note and not out.write(out.note + "\n"):
                        self._notes[task.id] = out.note
        except OSError as e:  # no log, or no room for the body: no script can start
            if not began:
                with self._lock:
                    cancel, stopping = self._stops.get(task.id), self._shutdown is not None
                if cancel:  # asked while it waited for room
                    self._notes[task.id] = stop_line_before_start(cancel)
                    self._scripts_over(task.id, cancel[0])
                    return Outcome(cancel[0])
                if stopping:
                    return Outcome("pending")  # as never_began: stop_claiming puts it back
                if e.errno in NO_ROOM_ERRNOS:
                    return Outcome(NO_ROOM)
            log.error("task %s: cannot start it: %s", task.id, e)
            self._notes[task.id] = f"Task Train could not start this task: {e.strerror}."
            self._scripts_over(task.id, "failed")
            return Outcome("failed")
        except Exception:
            log.exception("task %s: the runner failed", task.id)
            self._scripts_over(task.id, "failed")
            return Outcome("failed")

    def _scripts_over(self, task_id, status):
        """Note that no script of the task runs any more: from here on a stop is too
        late for it, and a wait for its start is over."""
        with self._lock:
            self._ended = (task_id, status)
            self._started_or_ended.notify_all()

    def _prepare(self, task, scan):
        """The task's Scripts and their environment, made while the claim syncs."""
        args = task.args
        shown_folder = task_folder(task, self.shown_scripts_dir)
        scripts = []
        for path in scan.scripts():
            shown = printable(os.path.join(shown_folder, os.path.basename(path)))
            scripts.append(Script([path] + args, shown, command_line([shown] + args) + "\n"))
        env = dict(self.env)
        env[b"TASKTRAIN_TASK_ID"] = task.id.encode()
        env[b"TASKTRAIN_TASK_NAME"] = task.name.encode()
        for key, value in zip(FORGE_ENV, (task.event, task.delivery, task.ref, task.commit)):
            if value is not None:
                env[key.encode()] = value.encode()
        return scripts, env

    def _timeout(self, task):
        """The task's time limit in seconds (0: none), read from its settings as it
        starts, else --timeout; and the line saying why its settings cannot be used."""
        try:
            settings = read_task_settings(os.path.join(self.scripts_dir, task.name),
                                          task_folder(task, self.shown_scripts_dir))
        except SettingsError as e:
            return self.timeout_s, f"{e} The task was not run."
        return (self.timeout_s if settings.timeout_s is None else settings.timeout_s), None

    def _run_scripts(self, task, scripts, env, stdin, out, timeout_s, problem):
        """Run the scripts in turn until one fails or the task is stopped; `problem`:
        why its settings cannot be used, which runs none."""
        if not scripts:
            out.write(MISSING_SCRIPTS + "\n")
            return Outcome("failed", 2)
        if problem:
            out.write(problem + "\n")
            return Outcome("failed", 2)
        timer = timeout_s and start_timer(timeout_s, self.stop, task.id, "failed",
                                          f"Timed out after {timeout_s:g} s.")
        folder = os.path.join(self.scripts_dir, task.name)
        runs, exit_code, stop = [], 0, None
        try:
            for i, script in enumerate(scripts):
                # A stop counts if it kept a script from starting or came while one
                # ran; one that comes after the last script has exited is too late.
                stop = self._stop_asked(task.id)
                if stop:
                    break
                if not out.write(script.line):
                    if not runs and out.no_room:  # nothing has started: worth a later try
                        out.note = None
                        with contextlib.suppress(OSError):  # a cut line would look like a start
                            os.ftruncate(out.fd, os.fstat(out.fd).st_size - out.cut)
                        return Outcome(NO_ROOM)
                    out.note = NOT_STARTED.format(out.error)  # see never_started
                    return Outcome("failed", None, runs)
                with self._lock:
                    self._started = task.id
                    self._started_or_ended.notify_all()
                exit_code, seconds, stop = self._run_script(task, script, folder, env, stdin,
                                                            out)
                out.write(f"exit code: {exit_code}\n\n")
                runs.append({"path": script.shown, "exit_code": exit_code,
                             "seconds": round(seconds, 3)})
                if exit_code != 0 or stop:
                    break
                if i + 1 < len(scripts):
                    with contextlib.suppress(sqlite3.Error):  # a full disk: finish has them
                        self.store.record_scripts(task.id, runs)
        finally:
            if timer:
                timer.cancel()
        if stop:
            out.write((stop[1] if runs else stop_line_before_start(stop)) + "\n")
            return Outcome(stop[0], exit_code if runs else None, runs)
        return Outcome("complete" if exit_code == 0 else "failed", exit_code, runs)

    def _run_script(self, task, script, folder, env, stdin, out):
        """Run one Script in its own process group; returns (exit code, seconds, the
        stop that came while it ran, if one did)."""
        started = time.monotonic()
        try:
            proc = start_script(script.argv, folder, env, stdin, out)
        except OSError as e:
            out.write(f"cannot run {script.shown}: {why_not_run(script.argv[0], e)}\n")
            exit_code = 127 if isinstance(e, FileNotFoundError) else 126
            return exit_code, time.monotonic() - started, None
        if self._track(task.id, proc):
            self._begin_stop(proc)
        with contextlib.suppress(sqlite3.Error):  # a full disk must not orphan the script
            self.store.record_process(task.id, proc.pid)
        self.store.make_spare_log()  # while the script runs: off the next start's path
        returncode = proc.wait()
        stop = self._track(task.id, None)
        if stop:
            self._await_group(proc.pid)
        if signal_group(proc.pid, 0):
            self._left_behind.add(proc.pid)
            with contextlib.suppress(sqlite3.Error):  # a full disk: stopped at its end all the same
                self.store.record_left_group(task.id, proc.pid)
        self._reap_left_behind()
        return exit_status(returncode), time.monotonic() - started, stop


    # -- after a task: .on-finish --

    def _run_on_finish(self, task, path, outcome, env, stdin, out, timeout_s):
        """Run the task's .on-finish, at `path`, once its scripts are done: told how
        the task ended, it cannot change that. Bounded by the task's timeout; at a
        stop, by what is left of --grace, so that a stop takes no longer for it."""
        exit_code = "" if outcome.exit_code is None else str(outcome.exit_code)
        shown = os.path.join(task_folder(task, self.shown_scripts_dir), ON_FINISH)
        out.write(f"{ON_FINISH_LINE_START}{outcome.status}, exit code {exit_code or 'none'}): "
                  + command_line([shown] + task.args) + "\n")
        with self._lock:
            deadline = self._stop_deadline
        if deadline is not None and deadline <= time.monotonic():
            out.write("not run: Task Train is stopping, and --grace has run out.\n\n")
            return
        env = {**env, b"TASKTRAIN_STATUS": outcome.status.encode(),
               b"TASKTRAIN_EXIT_CODE": exit_code.encode()}
        try:
            proc = start_script([path] + task.args, os.path.dirname(path), env, stdin, out)
        except OSError as e:
            out.write(f"cannot run {shown}: {why_not_run(path, e)}\n\n")
            return
        with contextlib.suppress(sqlite3.Error):  # a restart after a crash stops it too
            self.store.record_process(task.id, proc.pid)
        with self._lock:
            self._finishing, deadline = proc, self._stop_deadline
        if deadline is not None:  # a stop came after the check above
            self._kill_later(proc, deadline - time.monotonic())
        timed_out = threading.Event()
        timer = timeout_s and start_timer(timeout_s, self._time_out, proc, timed_out)
        returncode = proc.wait()
        if timer:
            timer.cancel()
        with self._lock:
            self._finishing, deadline = None, self._stop_deadline
        out.write(f"exit code: {exit_status(returncode)}\n")
        if timed_out.is_set():
            out.write(f"on-finish timed out after {timeout_s:g} s.\n")
        elif returncode == -signal.SIGKILL and deadline is not None:
            out.write("on-finish killed: Task Train is stopping, and --grace ran out.\n")
        if signal_group(proc.pid, 0):
            self._left_behind.add(proc.pid)
            self._stop_left_behind(out, "its .on-finish")
        out.write("\n")

    def _on_finish_path(self, task):
        """The task's .on-finish, or None if it has none."""
        path = os.path.join(self.scripts_dir, task.name, ON_FINISH)
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None

    def _time_out(self, proc, timed_out):
        """Stop an .on-finish that ran past the task's timeout."""
        timed_out.set()
        self._begin_stop(proc)

    def _kill_later(self, proc, seconds):
        """SIGKILL a process's group in `seconds` if its leader is still unreaped."""
        start_timer(max(0.0, seconds), self._kill_unreaped, proc)


def stop_line_before_start(stop):
    """The line a stop, (status, line), leaves in the log of a task none of whose
    scripts started: a cancel says the task never ran."""
    return CANCELLED_PENDING if stop[1] == CANCELLED_RUNNING else stop[1]


def start_script(argv, folder, env, stdin, out):
    """Start a script (or .on-finish) in its own process group, output to the log;
    every one reads the whole body."""
    if not isinstance(stdin, int):
        stdin.seek(0)
    return subprocess.Popen(argv, cwd=folder, env=env, stdin=stdin, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def exit_status(returncode):
    """A script's exit code; one killed by signal N exits 128 + N, as a shell reports it."""
    return returncode if returncode >= 0 else 128 - returncode


def start_timer(seconds, function, *args):
    """Call `function(*args)` in `seconds` on a daemon thread; returns the Timer."""
    timer = threading.Timer(seconds, function, args)
    timer.daemon = True
    timer.start()
    return timer


@contextlib.contextmanager
def stdin_for(body, devnull):
    """The scripts' stdin: /dev/null, or a temporary file holding the task's body."""
    if not body:
        yield devnull
        return
    with tempfile.TemporaryFile() as f:
        f.write(body)
        f.flush()
        yield f


def why_not_run(path, error):
    """Why a script could not be started, naming its interpreter when that is missing:
    execve says ENOENT alike for a missing script and a missing #! interpreter."""
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return error.strerror
    if isinstance(error, FileNotFoundError) and first.startswith(b"#!"):
        # As the kernel reads it: after "#!" and blanks, up to a blank or the newline.
        word = re.split(rb"[ \t]", first[2:].rstrip(b"\n").lstrip(b" \t"), maxsplit=1)[0]
        interpreter = printable(os.fsdecode(word))
        hint = " (a Windows line ending on the #! line?)" if interpreter.endswith("\r") else ""
        return f"its interpreter {interpreter!r} (from its #! line) was not found{hint}"
    if error.errno == errno.ENOEXEC:
        return f"{error.strerror} (a #! line is missing?)"
    return error.strerror


def signal_group(pgid, signum):
    """Send a signal to a process group; False if the group is gone."""
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def live_members(pgid):
    """The processes of a group that have not exited.

    Exited members linger as zombies until their parent reaps them: the daemon reaps
    those that are its own (when it is PID 1, in a container, orphans become its
    children); those another PID 1 has yet to reap do not count.
    """
    reap_group(pgid)
    if not signal_group(pgid, 0):
        return []
    if os.path.isdir("/proc"):
        return [pid for pid in os.listdir("/proc") if pid.isdigit() and member_runs(pid, pgid)]
    try:  # macOS: ps knows the zombies
        ps = subprocess.run(["ps", "-A", "-o", "pid=,pgid=,stat="], capture_output=True,
                            text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return [str(pgid)]  # one at least: the group is there
    return [pid for pid, group, state in (line.split()[:3] for line in ps.splitlines())
            if int(group) == pgid and not state.startswith("Z")]


def reap_group(pgid):
    """Collect the exited members of a group that are the daemon's own children."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-pgid, os.WNOHANG)[0]:
            pass


def being_killed(pid):
    """Whether a SIGKILL is pending for process `pid`, or the fatal signal that the
    kernel turns into one (Linux; False elsewhere)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            masks = [int(line.split()[1], 16) for line in f
                     if line.startswith((b"SigPnd:", b"ShdPnd:"))]
    except (OSError, ValueError):
        return False
    return any(mask & 1 << (signal.SIGKILL - 1) for mask in masks)


def boot_clock_ticks():
    """Now, in clock ticks since boot (Linux: as /proc/PID/stat counts a start), or
    None. A clock read, not a file: a script's start must not wait for the latter."""
    if not hasattr(time, "CLOCK_BOOTTIME"):
        return None
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS_PER_S)


def process_start(pid):
    """When a process started, in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def group_is_tasks(pgid, task_id, leader_start):
    """Whether the process group recorded for a task before a crash is still the task's
    (Linux: the only system where a restart knows the boot, and so keeps groups): its
    leader lives on, started when it was recorded (within a second); or a live member
    has the task's id in its environment (a script's shell exited, its children live
    on). A number that another process has taken since is not the task's."""
    started = process_start(pgid)
    # Recorded just after its fork, a tick or so late; a number taken since belongs to
    # a process that started long after (the pids had to go round first).
    if None not in (started, leader_start) and abs(started - leader_start) <= CLOCK_TICKS_PER_S:
        return True
    needle = b"\0TASKTRAIN_TASK_ID=" + task_id.encode() + b"\0"
    for pid in live_members(pgid):
        with contextlib.suppress(OSError):  # gone meanwhile, or another user's
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in b"\0" + f.read():
                    return True
    return False


def member_runs(pid, pgid):
    """Whether process `pid` is in group `pgid` and has not exited (Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state, _, group = f.read().rsplit(b")", 1)[1].split()[:3]
    except OSError:
        return False
    return int(group) == pgid and state != b"Z"


# ----------------------------------------------------------------------------
# Rendering: text, JSON and HTML, pure functions of a task snapshot
# ----------------------------------------------------------------------------

# C0, DEL and C1 controls, and the line and paragraph separators: each ends a line for
# some reader (Python's splitlines() breaks at U+0085 and U+2028).
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def shell_quote(arg):
    """shlex.quote, but control characters are written $'\\n': a record keeps its lines."""
    if not CONTROL_RE.search(arg):
        return shlex.quote(arg)
    escaped = "".join(
        {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c)
        or (c if not CONTROL_RE.match(c) else "".join(f"\\x{b:02x}" for b in c.encode()))
        for c in arg)
    return "$'" + escaped + "'"


def command_line(argv):
    """An argv as a shell would read it, one quoted word per argument."""
    return " ".join(shell_quote(a) for a in argv)


# What json.dumps writes otherwise than PHP's json_encode: PHP escapes `/` and leaves
# DEL as it is. An escaped backslash is matched whole, so that `\\u007f` stays.
PHP_JSON_RE = re.compile(r"\\\\|\\u007f|/")
PHP_JSON_TEXT = {"\\u007f": "\x7f", "/": "\\/"}


def php_json(params_json):
    """PHP's json_encode of the params: `\\/`, `\\uXXXX`, `[]` for none, a list for keys 0..n-1."""
    if params_json.startswith('{"0":'):
        params = json.loads(params_json)
        if list(params) == [str(i) for i in range(len(params))]:
            params_json = json.dumps(list(params.values()), separators=(",", ":"))
    elif params_json == "{}":
        return "[]"
    return PHP_JSON_RE.sub(lambda m: PHP_JSON_TEXT.get(m[0], m[0]), params_json)


def rfc2822(us):
    """PHP date('r') in the server's local time zone."""
    return time.strftime("%a, %d %b %Y %H:%M:%S %z", time.localtime(us // 1_000_000))


def iso8601(us):
    """ISO 8601 in the server's local time zone, or None."""
    if us is None:
        return None
    t = time.localtime(us // 1_000_000)
    offset = time.strftime("%z", t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + offset[:3] + ":" + offset[3:]


def task_folder(task, shown_scripts_dir):
    """The task's scripts folder as the user named it."""
    return os.path.join(shown_scripts_dir, task.name)


def render_process(task, shown_scripts_dir):
    """The PROCESS line: the scripts' glob, unquoted, then each argument quoted."""
    glob = shell_quote(task_folder(task, shown_scripts_dir)) + "/*"
    return glob + " " + command_line(task.args)


def render_record_head(task, shown_scripts_dir):
    """The record's seven lines up to `RESULTS: `; the output and one newline follow."""
    return (f"ID:      {task.id}\n"
            f"NAME:    {task.name}\n"
            f"PARAMS:  {php_json(task.params_json)}\n"
            f"STATUS:  {task.status}\n"
            f"CREATED: {rfc2822(task.created_us)}\n"
            f"PROCESS: {render_process(task, shown_scripts_dir)}\n"
            f"RESULTS: ")


def task_fields(task, shown_scripts_dir, position=None):
    """The task as a JSON-ready dict, without its output."""
    return {
        "id": task.id,
        "name": task.name,
        "params": task.params,
        "status": task.status,
        "created": iso8601(task.created_us),
        "started": iso8601(task.started_us),
        "finished": iso8601(task.finished_us),
        "exit_code": task.exit_code,
        "process": [task_folder(task, shown_scripts_dir) + "/*"] + task.args,
        "position": position,
        "scripts": task.scripts,
        "event": task.event,
        "delivery": task.delivery,
        "ref": task.ref,
        "commit": task.commit,
        "superseded_by": task.superseded_by,
    }


def json_bytes(value):
    """A JSON answer's body."""
    return json.dumps(value, ensure_ascii=False).encode() + b"\n"


def render_task_json(fields, log_file):
    """A task's JSON with its output, streamed from its log: a huge log costs no memory."""
    yield json.dumps(fields, ensure_ascii=False)[:-1].encode() + b', "output": "'
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for chunk in read_chunks(log_file):
        yield json.dumps(decoder.decode(chunk), ensure_ascii=False)[1:-1].encode()
    yield json.dumps(decoder.decode(b"", final=True), ensure_ascii=False)[1:-1].encode()
    yield b'"}\n'


def render_json_list(tasks, shown_scripts_dir, position):
    """The task list as JSON, without output, a task at a time; `position(task_id)`
    gives a pending task's position in the queue."""
    separator = b"["
    for task in tasks:
        fields = task_fields(task, shown_scripts_dir, position(task.id))
        yield separator + json.dumps(fields, ensure_ascii=False).encode()
        separator = b",\n"
    yield b"[]\n" if separator == b"[" else b"]\n"


def render_records(tasks, shown_scripts_dir, log_path):
    """The text records one after another, each as GET /tasks/ID gives it."""
    for task in tasks:
        yield render_record_head(task, shown_scripts_dir).encode()
        with open_log_to_read(log_path(task.id)) as f:
            yield from read_chunks(f)
        yield b"\n"


PAGE_CSS = """
body { font-family: sans-serif; font-size: 15px; margin: .8em; }
h1 { font-size: 1.4em; margin: 0 0 .3em; } h2 { font-size: 1.1em; margin: 1em 0 .3em; }
table { border-collapse: collapse; } tr + tr { border-top: 1px solid #ddd; }
th, td { padding: .1em .6em; text-align: left; vertical-align: top; }
th { font-weight: normal; color: #555; white-space: nowrap; } .status { font-weight: bold; }
td { white-space: pre-wrap; overflow-wrap: anywhere; }  /* a long value wraps */
.tasks > div { display: grid; column-gap: .6em; padding: .1em .4em; white-space: nowrap;
  grid-template-columns: 9.8em 9em minmax(8em, 1fr) 8.6em 12.6em 15.6em 7.2em 4.4em; }
.tasks > div + div { border-top: 1px solid #ddd; } .tasks p { display: contents; }
.tasks br { display: none; } .tasks span { overflow: hidden; text-overflow: ellipsis; }
.tasks button { font-size: .8em; line-height: 1.1; padding: 0 .4em; margin: 0; }
code { overflow-wrap: anywhere; } button { font-size: .85em; padding: 0 .5em; }
.pending { color: #1f4e9c; } .running { background: yellow; } .complete { color: gray; }
.failed { color: #8B0000; } .cancelled { color: #b35900; }
#output { font-family: monospace; white-space: pre-wrap; overflow-wrap: anywhere; }
.skipped { color: gray; font-style: italic; }
"""


def render_page(title, body, refresh_s=None):
    """An HTML page around `body`, reloading itself every `refresh_s` if given."""
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">{refresh}'
            f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head>"
            f"<body>{body}</body></html>\n")


def local_time(us):
    """A moment as a short date and time in the server's time zone."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(us // 1_000_000))


def render_duration(seconds):
    """A duration as a person reads it: 4 ms, 4.2 s, 12 s, 3 min 05 s, 2 h 03 min."""
    if seconds < 10:
        return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return "%d min %02d s" % divmod(whole, 60) if whole >= 60 else f"{whole} s"
    return "%d h %02d min" % (whole // 3600, whole % 3600 // 60)


def render_elapsed(task, now, position):
    """How long the task ran or, at `now` (microseconds since the epoch), has been
    running; or where it waits in the queue."""
    if task.status == "pending":
        return {None: "waiting", 1: "next to run"}.get(position, f"waiting, #{position}")
    if task.started_us is None:
        return "never ran"
    seconds = max(0, (task.finished_us or now) - task.started_us) / 1e6
    return ("running for " if task.status == "running" else "") + render_duration(seconds)


def readable_params(params):
    """Params as `key=value` words, each value quoted as a shell would read it."""
    return " ".join(f"{key}={shell_quote(value)}" for key, value in params.items())


def render_cancel_button(task, url):
    """A Cancel button for an unfinished task; hidden until CANCEL_SCRIPT runs."""
    if task.finished:
        return ""
    return f'<button type="button" data-cancel="{url}" data-task="{task.id}" hidden>Cancel</button>'


def render_task_div(task, now, position):
    """One task as the original's div: its class is its status, then ID, Name, Params,
    Status and Date as the original labelled them, then duration, exit code and Cancel.
    Params are shown as key=value, cut where the column ends; their PHP JSON (as in the
    text record) is the tooltip. Each field is a span, so that CSS can lay out a row."""
    e = html.escape  # for what came from a user; ids, statuses and numbers are the daemon's
    params = readable_params(task.params)
    shown = params if len(params) <= LIST_PARAMS_CHARS else params[:LIST_PARAMS_CHARS] + "…"
    as_json = php_json(task.params_json)
    if len(as_json) > LIST_PARAMS_TOOLTIP_CHARS:
        as_json = as_json[:LIST_PARAMS_TOOLTIP_CHARS] + "…"
    exit_code = "" if task.exit_code is None else task.exit_code
    link = "tasks/" + task.id
    return (f'<div class="{task.status}">\n'
            f'<p><span>ID: <a href="{link}">{task.id}</a></span><br />\n'
            f"<span>Name: {e(task.name)}</span><br />\n"
            f'<span title="{e(as_json)}">Params: {e(shown)}</span><br />\n'
            f'<span class="status">Status: {task.status}</span><br />\n'
            f'<span title="{rfc2822(task.created_us)}">Date: {local_time(task.created_us)}'
            f"</span></p>\n"
            f"<p><span>Duration: {render_elapsed(task, now, position(task.id))}</span><br />\n"
            f"<span>Exit code: {exit_code}</span><br />\n"
            f"<span>{render_cancel_button(task, link)}</span></p>\n</div>")


def render_list_html(tasks, pending, busy, now, position, older=None, newest=None):
    """The /tasks page: one page of the list, newest first, with links to the newest and
    the older tasks. It reloads itself while what it shows, or a new task, may change.

    `position(task_id)` is a pending task's position in the queue; `now` is the time in
    microseconds since the epoch; `older` and `newest` are relative URLs, or None where
    there is no such page.
    """
    unfinished = any(not task.finished for task in tasks)
    parts = ["<h1>Task Train</h1>", f"<p>{pending} pending task(s).</p>"]
    if tasks:
        parts.append('<div class="tasks">\n'
                     + "\n".join(render_task_div(task, now, position) for task in tasks)
                     + "\n</div>")
    else:
        parts.append("<p>No older tasks.</p>" if newest else "<p>No tasks yet.</p>")
    links = [f'<a href="{html.escape(url)}">{text}</a>'
             for url, text in ((newest, "Newest tasks"), (older, "Older tasks")) if url]
    if links:
        parts.append("<p>" + " · ".join(links) + "</p>")
    if unfinished:
        parts.append(CANCEL_SCRIPT)
    refresh = busy and (unfinished or newest is None)
    return render_page("Task Train", "\n".join(parts), LIST_REFRESH_S if refresh else None)


CANCEL_SCRIPT = """<script>
for (const button of document.querySelectorAll("button[data-cancel]")) {
  button.hidden = false;
  button.addEventListener("click", async () => {
    if (!confirm("Cancel task " + button.dataset.task + "?")) return;
    button.disabled = true;
    button.textContent = "Cancelling\u2026";
    try {
      // A same-origin fetch: the browser adds Origin, Sec-Fetch-Site and the page's
      // Basic credentials, so the daemon's cross-site and token checks let it pass.
      // Resolved against location.href, which has no user:password@ (as the page's
      // base URL may have): Chromium refuses to fetch a URL that carries them.
      const answer = await fetch(new URL(button.dataset.cancel, location.href),
                                 {method: "DELETE", headers: {Accept: "application/json"}});
      if (!answer.ok) alert(await answer.json().then(j => j.error, () => answer.statusText));
    } catch (e) {
      alert("Task Train did not answer: " + e.message);
    }
    location.reload();
  });
}
</script>"""

FOLLOW_SCRIPT = """<script>
(async () => {
  // At most KEEP characters stay in the page, the oldest dropped first; it is redrawn
  // at most every 100 ms, with at most BATCH new characters. Measured in Chromium: a
  // page that appended a whole 100 MB log froze its tab for 35 s, and one that redrew
  // its whole million characters at each change stalled for 400 ms at a time. Ended
  // lines go into blocks of their own, so that a redraw lays out only what is new;
  // the last block holds the line still being written.
  const KEEP = %d, BATCH = 65536;
  const out = document.getElementById("output"), status = document.getElementById("status");
  const open = out.lastElementChild;
  let kept = out.textContent.length - open.textContent.length, unshown = "", timer = null;
  const root = document.documentElement;
  const atBottom = () => innerHeight + scrollY >= root.scrollHeight - 40;
  const add = (text, className) => {
    const block = document.createElement("div");
    block.textContent = text;
    block.className = className;
    out.insertBefore(block, open);
    kept += text.length;
  };
  const show = () => {
    timer = null;
    const stayAtBottom = atBottom();
    let text = open.textContent + unshown;
    unshown = "";
    if (text.length > BATCH) {  // faster than anyone reads: show the newest lines
      text = text.slice(text.indexOf("\\n", text.length - BATCH) + 1);
      while (out.firstElementChild !== open) out.firstElementChild.remove();
      kept = 0;
      add("[Output came faster than this page shows it; the full log has every line.]\\n",
          "skipped");
    }
    let cut = text.lastIndexOf("\\n") + 1;
    if (text.length - cut >= BATCH) cut = text.length;  // one huge line: break it
    if (cut) add(text.slice(0, cut), "");
    open.textContent = text.slice(cut);
    while (kept > KEEP && out.firstElementChild !== open) {
      kept -= out.firstElementChild.textContent.length;
      out.firstElementChild.remove();
    }
    if (stayAtBottom) scrollTo(0, root.scrollHeight);
  };
  scrollTo(0, root.scrollHeight);
  try {
    const response = await fetch(new URL(out.dataset.follow, location.href), {cache: "no-store"});
    if (!response.ok) throw new Error(response.statusText);
    const reader = response.body.getReader(), decoder = new TextDecoder();
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      if (status.textContent === "pending") status.textContent = status.className = "running";
      unshown += decoder.decode(value, {stream: true});
      if (unshown.length > 2 * BATCH) unshown = unshown.slice(-BATCH - 1);
      timer = timer || setTimeout(show, 100);
    }
  } catch (e) {}
  if (timer) {
    clearTimeout(timer);
    show();
  }
  // The stream ends with the task, or with the daemon: reload once it answers again
  // (a proxy in front answers 502 or 504 for a daemon that is not there).
  const answers = () => fetch(location.href, {method: "HEAD", cache: "no-store"})
    .then(response => response.status < 500, () => false);
  while (!(await answers())) await new Promise(wake => setTimeout(wake, 2000));
  location.reload();
})();
</script>""" % LIVE_KEEP_CHARS


def shown_from(tail):
    """Where a page shows a log's tail from: after its first line break, for the line
    before it is cut; but a cut line longer than CUT_LINE_MAX_BYTES is shown by its
    end, from its first whole character, rather than not at all."""
    line_break = tail.find(b"\n", 0, CUT_LINE_MAX_BYTES)
    if line_break >= 0:
        return line_break + 1
    start = 0
    while start < min(len(tail), 3) and tail[start] & 0xC0 == 0x80:  # inside a UTF-8 character
        start += 1
    return start


def render_task_html(task, shown_scripts_dir, tail, tail_start, now, position=None):
    """A task's page for a browser: its fields, each script's outcome and the end of its
    output, which follows live from where the shown part ends while the task runs.

    `tail` holds the log's bytes from offset `tail_start` on; the page shows it from
    shown_from on, and up to a line's end, so that no character is cut in two where
    the live part joins.
    """
    e = html.escape
    skip = shown_from(tail) if tail_start else 0
    end = len(tail) if task.finished else max(skip, tail.rfind(b"\n") + 1)
    fields = [("Status", f'<span id="status" class="{task.status}">{task.status}</span>'),
              ("Params", e(readable_params(task.params)) or "none"),
              ("Created", rfc2822(task.created_us))]
    if task.started_us:
        fields.append(("Started", rfc2822(task.started_us)))
    if task.finished_us:
        fields.append(("Finished", rfc2822(task.finished_us)))
    fields.append(("Duration", render_elapsed(task, now, position)))
    if task.exit_code is not None:
        fields.append(("Exit code", str(task.exit_code)))
    if task.superseded_by:
        fields.append(("Superseded by",
                       f'<a href="{e(task.superseded_by)}">{e(task.superseded_by)}</a>'))
    fields.append(("Process", f"<code>{e(render_process(task, shown_scripts_dir))}</code>"))
    parts = [
        '<p><a href="../tasks">All tasks</a></p>',
        f"<h1>{e(task.name)} {task.id}</h1>",
        '<table class="fields">'
        + "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in fields)
        + "</table>",
    ]
    if not task.finished:
        parts.append(f"<p>{render_cancel_button(task, task.id)}</p>")
    if task.scripts:
        parts.append("<h2>Scripts</h2>\n<table><tr><th>Script</th><th>Exit code</th>"
                     "<th>Duration</th></tr>" + "".join(
                         f'<tr class="{"complete" if run["exit_code"] == 0 else "failed"}">'
                         f'<td>{e(run["path"])}</td><td>{run["exit_code"]}</td>'
                         f'<td>{render_duration(run["seconds"])}</td></tr>'
                         for run in task.scripts) + "</table>")
    full_log = f'<a href="{task.id}/log">the full log</a>'
    earlier = (f" This page keeps the last lines; {full_log} has them all."
               if not task.finished else
               f" Earlier output is in {full_log}." if tail_start + skip else "")
    parts.append(f'<h2>Output</h2>\n<p><a href="#end">Last lines</a>.{earlier}</p>')
    follow = (f' data-follow="{e(f"{task.id}/log?follow=1&from={tail_start + end}")}"'
              if not task.finished else "")
    shown = tail[skip:end].decode("utf-8", "replace")
    parts.append(f'<div id="output"{follow}><div>{e(shown)}</div><div></div></div>'
                 '<div id="end"></div>')
    if not task.finished:
        parts += [CANCEL_SCRIPT, FOLLOW_SCRIPT]
    return render_page(f"Task Train: {task.name} {task.id}", "\n".join(parts))


# ----------------------------------------------------------------------------
# HTTP handler and routing
# ----------------------------------------------------------------------------

class HTTPError(Exception):
    """An answer with a 4xx or 5xx status and a one-line reason."""

    def __init__(self, status, reason, headers=None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


def abort(status, reason, headers=None):
    """Stop handling the request and answer `status` with a one-line reason."""
    raise HTTPError(status, reason, headers)


def not_found():
    """Answer 404 `Not found`, without a newline, as the original's server.php does."""
    abort(404, NOT_FOUND)


def unauthorized(reason="Authentication required."):
    """Answer 401, asking a browser for the token as a Basic password."""
    abort(401, reason, {"WWW-Authenticate": 'Basic realm="Task Train"'})


class RequestHeaders(http.client.HTTPMessage):
    """A request's header fields, found by name in a dict: a request asks for some 20
    of them, and HTTPMessage.get() compares the name of every field each time."""

    def __init__(self, fields):
        super().__init__()
        self._headers = fields  # [(name, value)] in order, as HTTPMessage keeps them
        self._by_name = {}
        for name, value in fields:
            self._by_name.setdefault(name.lower(), []).append(value)

    def get(self, name, failobj=None):
        """The first value of the field `name` (any case), or failobj."""
        values = self._by_name.get(name.lower())
        return values[0] if values else failobj

    def get_all(self, name, failobj=None):
        """Every value of the field `name` (any case), in order, or failobj."""
        values = self._by_name.get(name.lower())
        return list(values) if values else failobj


def read_header_fields(rfile):
    """A request's header fields, read to the blank line that ends its head.

    What http.client refuses is refused alike (431). A line that is not `name: value`
    is a 400 once the head is read: a folded line (RFC 9112 section 5.2), no colon, a
    name that is no token, or a CR or NUL in the value, any of which an agent in front
    may have read otherwise, and so taken a different Content-Length for the body.
    """
    fields, malformed, size = [], False, 0
    for count in itertools.count(1):
        line = rfile.readline(MAX_HEAD_LINE_BYTES + 1)
        if len(line) > MAX_HEAD_LINE_BYTES:
            abort(431, "Line too long")
        if line in (b"\r\n", b"\n", b""):
            break
        if count > MAX_HEAD_FIELDS:
            abort(431, "Too many headers")
        size += len(line)
        if size > MAX_HEAD_FIELDS_BYTES:
            abort(431, "Header fields too large: 64 KiB in all at most.")
        name, colon, value = line.decode("latin-1").removesuffix("\n").removesuffix("\r") \
            .partition(":")
        value = value.strip(" \t")
        if colon and FIELD_NAME_RE.fullmatch(name) and "\r" not in value and "\0" not in value:
            fields.append((name, value))
        else:
            malformed = True
    if malformed:
        abort(400, "Malformed header line.")
    return RequestHeaders(fields)


ZERO_Q_RE = re.compile(r"0(\.0{0,3})?")  # q=0, 0.0 ... 0.000


def accepted_types(accept):
    """The media types an Accept header names (lowercase), but those it gives q=0."""
    types = set()
    for item in accept.split(","):
        media_range, *params = item.split(";")
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q" and ZERO_Q_RE.fullmatch(value.strip()):
                break  # not acceptable (RFC 9110 section 12.4.2)
        else:
            types.add(media_range.strip().lower())
    return types


def split_target(target):
    """(authority or None, path, query) of a request target: the origin form
    `/path?query`, whose path is taken as it is (`//tasks` is no route), or the
    absolute form `http://host/path?query`, whose authority stands for the Host
    header (RFC 9112 section 3.2). Any other form matches no route; a URL that cannot
    be parsed is a 400."""
    target = target.partition("#")[0]
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return None, path, query
    try:
        url = urllib.parse.urlsplit(target)
    except ValueError:  # a bracketed host that is no IPv6 address
        abort(400, "Bad request target.")
    if url.scheme.lower() in ("http", "https") and url.netloc:
        return url.netloc, url.path or "/", url.query
    return None, target, ""


def parse_form(raw):
    """Decode `a=1&b=2` bytes strictly: bad percent-encoding or UTF-8 is a 400."""
    pairs = []
    for part in raw.split(b"&"):
        if not part:
            continue
        key, _, value = part.partition(b"=")
        pairs.append((unquote_strict(key), unquote_strict(value)))
    return pairs


def unquote_strict(raw):
    """Percent-decode one part of a form to text, or abort with a 400."""
    if BAD_PERCENT_RE.search(raw):
        abort(400, "Bad percent-encoding in the parameters.")
    try:
        return urllib.parse.unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        abort(400, "Parameters must be UTF-8.")


def check_params(params):
    """Abort with a 400 naming the first parameter that breaks a rule."""
    if len(params) > MAX_PARAMS:
        abort(400, f"Too many parameters: at most {MAX_PARAMS}.")
    for key, value in params.items():
        if not KEY_RE.fullmatch(key):
            abort(400, f"Bad parameter name {key!r}: use letters, digits, _ . - (at most 64).")
        if "\0" in value:
            abort(400, f"Parameter {key!r} holds a NUL byte.")
        if len(value.encode()) > MAX_VALUE_BYTES:
            abort(400, f"Parameter {key!r} is longer than {MAX_VALUE_BYTES} bytes.")


def host_name(value):
    """The name in a Host header (or an --allow-host), lowercase, without its port."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:5800
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_ipv6_address(name):
    """Whether a name in brackets is an IPv6 address (Python before 3.11 lets urlsplit
    take `[x]` as a host)."""
    try:
        ipaddress.IPv6Address(name.partition("%")[0])
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=64)  # ipaddress's parse was ~5% of a submission's CPU
def is_loopback_name(name):
    """Whether a Host name (or a --host to listen on) can only mean this machine:
    localhost, *.localhost (RFC 6761), 127.0.0.0/8 or ::1."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bounded_decimal(text, ceiling):
    """The whole number `text` writes in ASCII digits, or `ceiling` if it is larger;
    None if `text` is no such number."""
    if not (text.isascii() and text.isdigit()):
        return None
    # Cut before int(): Python 3.11 refuses to convert over 4,300 digits
    # (CVE-2020-10735). Cut one digit longer than `ceiling`, the value is still above it.
    return min(int(text.lstrip("0")[:len(str(ceiling)) + 1] or "0"), ceiling)


def preferred_wait(prefer_headers):
    """N of the first `wait` preference (RFC 7240: later ones do not count), at most
    MAX_WAIT_S; None if there is none or it is not a non-negative integer."""
    for header in prefer_headers:
        for preference in header.split(","):
            token, _, value = preference.split(";")[0].partition("=")
            if token.strip().lower() == "wait":
                return bounded_decimal(value.strip().strip('"'), MAX_WAIT_S)
    return None


def media_type(headers):
    """The request's Content-Type without its parameters, lowercase ("" if none)."""
    return headers.get("Content-Type", "").split(";")[0].strip().lower()


def forge_headers(headers):
    """(event header, delivery header, the event's value) of a forge's delivery, the
    forge's own headers first; or None for a request that is no forge event."""
    for event_header, delivery_header in FORGE_HEADERS:
        value = headers.get(event_header)
        if value is not None:
            return event_header, delivery_header, value
    return None


def forge_event(headers, body, payload=None):
    """(ForgeEvent, payload) if the request is a forge's webhook delivery, else None;
    a 400 if its headers or payload cannot be used.

    The payload, the scripts' stdin, is `payload` if given (what its signature
    covered), else the `payload` field of a form (GitHub's default content type),
    else the body as sent.
    """
    found = forge_headers(headers)
    if found is None:
        return None
    event_header, delivery_header, value = found
    if not (EVENT_HEADER_RE.fullmatch(value) and EVENT_RE.fullmatch(event_name(value))):
        abort(400, f"Bad {event_header} header: {value!r}.")
    delivery = headers.get(delivery_header)
    if delivery is not None and not DELIVERY_RE.fullmatch(delivery):
        abort(400, f"Bad {delivery_header} header: {delivery!r}.")
    if payload is None:
        payload = form_payload(headers, body)
        payload = body if payload is None else payload
    ref, commit = payload_ref_and_commit(payload, gitlab=event_header == "X-Gitlab-Event")
    return ForgeEvent(value.strip(), delivery, ref, commit), payload


def lone_payload_field(body):
    """The decoded value of a form that is one `payload` field and nothing else, as
    Gitea, Forgejo and Gogs send a webhook; or None. Cheap enough to run on a body
    before its signature is checked: 1 MiB of `%41` took urllib 86 ms to decode."""
    value = body[len(b"payload="):]
    if (not body.startswith(b"payload=") or BAD_PERCENT_RE.search(value)
            or any(c in value for c in (b"&", b"=", b"\r", b"\n"))):
        return None
    # With no `=` of its own, every `%` followed by two hex digits and no line break,
    # it decodes as quoted-printable does with `=` for `%`, in C (3 ms for that MiB).
    return binascii.a2b_qp(value.replace(b"+", b" ").replace(b"%", b"="))


def form_payload(headers, body):
    """The `payload` field of a form body (GitHub's default content type for a webhook,
    and one Gitea's offers), or None."""
    if media_type(headers) == FORM_TYPE:
        with contextlib.suppress(HTTPError):  # a body that is no form has no payload field
            fields = dict(parse_form(body))
            if "payload" in fields:
                return fields["payload"].encode()
    return None


def event_name(header_value):
    """An event header's value as a name for settings: GitLab's `Tag Push Hook` is
    `tag_push`; the other forges' values are already such names."""
    words = header_value.strip().lower().split()
    if len(words) > 1 and words[-1] == "hook":
        words.pop()
    return "_".join(words)


def payload_ref_and_commit(payload, gitlab):
    """The `ref` and commit of a JSON object payload, each None if absent; the commit is
    `after`, or GitLab's `checkout_sha` (the commit an annotated tag points to)."""
    try:
        fields = json.loads(payload)
    except (ValueError, RecursionError):  # not JSON (or UTF-8), or nested beyond reason
        return None, None
    if not isinstance(fields, dict):
        return None, None
    commit = fields.get("checkout_sha") if gitlab else None
    if not isinstance(commit, str):
        commit = fields.get("after")
    return payload_text(fields.get("ref"), "ref"), payload_text(commit, "commit")


def payload_text(value, key):
    """A string from the payload that can go into the environment, or None if it is
    not a string; a 400 if it cannot."""
    if not isinstance(value, str):
        return None
    try:
        value.encode()
    except UnicodeEncodeError:  # JSON allows a lone surrogate
        abort(400, f"The payload's {key} is not valid Unicode.")
    if len(value) > MAX_REF_CHARS or any(ord(c) < 32 or c == "\x7f" for c in value):
        abort(400, f"The payload's {key} is over {MAX_REF_CHARS} characters or holds a "
                   "control character.")
    return value


def refuse_unsigned_params(pairs):
    """400 for a query parameter other than name: a webhook signature covers the body
    alone, so whoever saw one delivery could send it again with a URL of their own."""
    for key, _ in pairs:
        if key != "name":
            abort(400, f"Query parameter {key!r} refused: a webhook signature does not cover "
                       "the URL, so a signed request may carry only name there.")


def same_secret(given, expected):
    """Compare secrets in constant time, as bytes: `given` as the client sent them,
    `expected` a str as Python holds it (fsencode gives back the bytes of one from the
    command line or the environment)."""
    return hmac.compare_digest(given, os.fsencode(expected))


def header_bytes(value):
    """A header field's value as the bytes sent (fields are read as Latin-1)."""
    return value.encode("latin-1")


class ClientStream(io.RawIOBase):
    """A connection's socket, read and written in blocking mode under the kernel's
    timeouts (SO_RCVTIMEO, SO_SNDTIMEO) rather than Python's. A socket with a Python
    timeout polls before every read and write, and every settimeout sets its blocking
    mode again (an ioctl): each is a call that lets go of the interpreter lock, which
    in a burst of submissions hands it to another thread. Here a request costs one
    recv and one send.

    It keeps one deadline while a request head, or a body, arrives: the timeout alone
    bounds each wait for data, so a client sending a header line (or a body's byte)
    every few seconds would never be dropped, and a trickling body would hold its share
    of the body budget for ever."""

    def __init__(self, sock, timeout_s):
        super().__init__()
        self._sock = sock
        self._timeout_s = timeout_s  # each wait for data, or for room to send
        self._deadline = None  # monotonic time by which the head must be in; None: no limit
        # A timeval as this system's SO_RCVTIMEO takes it: 16 bytes (two 64-bit fields,
        # or macOS's long and padded int), or two longs where time_t has 32 bits.
        size = len(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
        self._timeval_format = "@qq" if size == 16 else "@ll"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._timeval(timeout_s))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._timeval(timeout_s))
        self._wait_s = timeout_s  # what SO_RCVTIMEO is set to
        self.stalled = False  # a send took nothing in a whole timeout: no write goes now
        self._head_begun = False  # since expect_head, a byte came other than CR or LF
        self.head_cut_short = False  # a head (or body) begun was not in by its deadline

    def readable(self):
        return True

    def writable(self):
        return True

    def readinto(self, buffer):
        """Read what has come, waiting no longer than the deadline if one is set."""
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out("the request head took too long")
            self._bound_waits(left)
        try:
            received = self._sock.recv_into(buffer)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            raise self._timed_out("the client sent nothing in time") from None
        if not self._head_begun:  # empty lines may come between requests (RFC 9112 2.2)
            self._head_begun = NOT_CR_OR_LF_RE.search(buffer, 0, received) is not None
        return received

    def _timed_out(self, why):
        """The timeout to raise, noting whether a request had begun."""
        self.head_cut_short = self._deadline is not None and self._head_begun
        return socket.timeout(why)

    def write(self, data):
        """Send what the socket takes within the timeout. Once a client has taken
        nothing for a whole timeout, every write fails at once: each flush on the way
        out (the handler's, the base class's, the close's) would wait a timeout more."""
        if not self.stalled:
            try:
                return self._sock.send(data)
            except BlockingIOError:  # SO_SNDTIMEO ran out
                self.stalled = True
        raise socket.timeout("the client took nothing in time")

    def expect_head(self, timeout_s):
        """A request head (or a body) is next: it must be in within `timeout_s`."""
        self._deadline = time.monotonic() + timeout_s
        self._head_begun, self.head_cut_short = False, False

    def head_done(self):
        """The head (or body) is in: each wait for data is bounded by the timeout again."""
        self._deadline, self.head_cut_short = None, False
        self._bound_waits(self._timeout_s)

    def _bound_waits(self, seconds):
        """Bound each wait for data by `seconds`: a millisecond from the bound set
        already is not worth a call (a head's first read would make one every request)."""
        if abs(seconds - self._wait_s) < 0.001:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._timeval(seconds))
        except OSError as e:  # macOS refuses options on a socket the client has reset
            raise ConnectionResetError(e.errno, e.strerror) from None
        self._wait_s = seconds

    def _timeval(self, seconds):
        """A socket timeout of `seconds` (at least a microsecond: zero means none)."""
        micros = max(1, round(seconds * 1_000_000))
        return struct.pack(self._timeval_format, *divmod(micros, 1_000_000))


class ByteBudget:
    """Bytes that all requests together may hold at once (their bodies)."""

    def __init__(self, total):
        self.total = total
        self._lock = threading.Lock()
        self._held = 0  # hold _lock to change it; never above total

    def reserve(self, n):
        """Take `n` bytes of the budget; False, taking none, if they are not left."""
        with self._lock:
            if self._held + n > self.total:
                return False
            self._held += n
            return True

    def release(self, n):
        """Give back `n` bytes taken with reserve()."""
        with self._lock:
            self._held -= n


class Handler(http.server.BaseHTTPRequestHandler):
    """Parse, authorize, call the store, render, send: nothing more."""

    protocol_version = "HTTP/1.1"
    server_version = "TaskTrain/" + __version__
    # A client that stalls for this long is dropped; each has its own thread.
    timeout = IDLE_TIMEOUT_S
    # A request head not in by then is dropped, however steadily it trickles in.
    head_timeout = HEAD_TIMEOUT_S

    ROUTES = (  # (pattern, {method: handler name})
        (re.compile(r"/"), {"GET": "home"}),
        (re.compile(r"/task"), {"POST": "submit"}),
        (re.compile(r"/tasks"), {"GET": "list_tasks"}),
        (re.compile(rf"/tasks/({ID_RE})"), {"GET": "get_task", "DELETE": "cancel_task"}),
        (re.compile(rf"/tasks/({ID_RE})/log"), {"GET": "show_log"}),
    )

    # -- dispatch --

    def setup(self):
        """Buffered streams over the connection (see ClientStream), as the base class
        would make them over a socket with a Python timeout."""
        self.connection = self.request
        try:
            # Nagle's algorithm and delayed ACKs cost ~40 ms a keep-alive request; and one
            # buffered write per answer (flushed at the end of _dispatch) sends it in one
            # packet.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            self.stream = ClientStream(self.connection, self.timeout)
        except OSError as e:  # macOS refuses options on a socket the client has reset
            raise ConnectionResetError(e.errno, e.strerror) from None
        self.rfile = io.BufferedReader(self.stream)
        self.wfile = io.BufferedWriter(self.stream, WRITE_BUFFER_BYTES)

    def finish(self):
        """Flush and close the streams, then close lingering (as Apache does): read
        what the client still sends, for up to LINGER_S and LINGER_MAX_BYTES, since a
        socket closed with data unread resets the connection, and the client could
        lose the answer before it (a 408 to a head that trickled, a 400 before a
        body). Not for a client that took nothing of its answer."""
        with contextlib.suppress(OSError):
            super().finish()
        if self.stream.stalled:
            return
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            until, left_to_read = time.monotonic() + LINGER_S, LINGER_MAX_BYTES
            while left_to_read > 0 and (seconds := until - time.monotonic()) > 0:
                self.connection.settimeout(seconds)
                received = len(self.connection.recv(COPY_CHUNK_BYTES))
                if not received:
                    break  # the client has closed its side too
                left_to_read -= received

    def handle_one_request(self):
        """Answer one request; every per-request field is set here first, so that
        nothing of a keep-alive connection's previous request survives into it."""
        self.command, self.requestline = None, ""  # until parsed
        self.request_version = self.default_request_version
        self.headers = None         # until parsed
        self.request_no = None      # counted as the answer starts (X-Req-Count)
        self.query = []             # the query's (key, value) pairs, decoded once
        self.query_values = {}      # the query's last value of each key
        self.body_length = 0        # declared; -1 if chunked or malformed
        self.body_pending = False   # a body is declared and not yet read
        self.needs_signature = False
        self.sent = False           # the answer has begun
        self.body_reserved = 0      # bytes of the server's body budget this request holds
        self.stream.expect_head(self.head_timeout)
        super().handle_one_request()
        if self.stream.head_cut_short:  # begun, not in by the deadline: the base class
            with contextlib.suppress(*CLIENT_GONE):  # closed without a word
                self.send_error(408, "Timed out reading the request head.")
                self.wfile.flush()

    def _dispatch(self):
        """Route, authorize and answer one request; errors become one-line answers."""
        self.stream.head_done()
        self.body_length = self._declared_length()
        self.body_pending = self.body_length != 0
        with self.server.answering():  # a stop waits for answers under way
            try:
                authority, path, query = split_target(self.path)
                self._refuse_browser_attacks(authority)
                self._refuse_multipart()
                method = "GET" if self.command == "HEAD" else self.command
                self.needs_signature = self._authorize(path, method)
                methods, args = self._route(path)
                if method not in methods:
                    allowed = sorted(methods) + (["HEAD"] if "GET" in methods else [])
                    abort(405, f"Method {self.command} is not allowed here.",
                          {"Allow": ", ".join(allowed)})
                # The request line was decoded as Latin-1: this gives back its bytes.
                self.query = parse_form(query.encode("latin-1"))
                self.query_values = dict(self.query)
                getattr(self, methods[method])(*args)
            except HTTPError as e:
                self._send_line(e.status, e.reason, e.headers)
            except sqlite3.OperationalError as e:  # a full disk: the transaction was rolled back
                log.error("cannot write the task store: %s", e)
                if self.sent:
                    self.close_connection = True
                else:
                    self._send_line(503, f"The task store cannot be written ({e}); nothing "
                                    "was changed. Try again later.",
                                    {"Retry-After": str(RETRY_AFTER_S)})
            except CLIENT_GONE:
                self.close_connection = True
            except Exception:
                log.exception("error answering %r", self.requestline)
                self.close_connection = True
                if not self.sent:
                    self._send_line(500, "Internal error; the daemon's log says more.")
            finally:
                self._release_body()
            try:
                self.wfile.flush()  # here, so that the answer has left when the count drops
            except CLIENT_GONE:
                self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def __getattr__(self, name):
        """do_METHOD for any other method, as the base class looks it up: on a known
        path, one it does not allow is a 405 with Allow, whatever it is (the base
        class answers 501 to a method it finds no do_ for)."""
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _route(self, path):
        """The handlers by method of the route that matches, and the path's arguments."""
        for pattern, methods in self.ROUTES:
            match = pattern.fullmatch(path)
            if match:
                return methods, match.groups()
        not_found()

    # -- request parsing --

    def parse_request(self):
        """Parse the request line as the base class does, and the header fields with
        read_header_fields: a submission's head and its ~20 lookups took 38 us through
        the base class's email parser, 9 us so (timeit), of ~700 us of CPU per
        submission. Sets command, path, request_version, headers, close_connection;
        False once a refusal is sent."""
        self.close_connection = True
        for _ in range(MAX_LEADING_EMPTY_LINES):
            if self.raw_requestline not in (b"\r\n", b"\n"):
                break
            self.raw_requestline = self.rfile.readline(MAX_HEAD_LINE_BYTES + 1)
        if self.raw_requestline in (b"\r\n", b"\n"):
            self.send_error(400, "Too many empty lines before the request line.")
            return False
        self.requestline = str(self.raw_requestline, "latin-1").rstrip("\r\n")
        words = self.requestline.split()
        if not words:
            return False
        try:
            if len(self.raw_requestline) > MAX_HEAD_LINE_BYTES:
                abort(414, "Request-URI Too Long")
            if len(words) >= 3:
                version = HTTP_VERSION_RE.fullmatch(words[-1])
                if not version:
                    abort(400, f"Bad request version ({words[-1]!r})")
                number = (int(version[1]), int(version[2]))
                if number >= (2, 0):
                    abort(505, f"Invalid HTTP version ({version[1]}.{version[2]})")
                if number < (1, 0):  # the base class would answer without a status line
                    abort(400, f"HTTP/{version[1]}.{version[2]} is not supported.")
                self.request_version = words[-1]
                self.close_connection = number < (1, 1)
            if len(words) == 2:
                abort(400, "HTTP/0.9 is not supported.")
            if len(words) != 3:
                abort(400, f"Bad request syntax ({self.requestline!r})")
            self.command, self.path = words[:2]
            if not FIELD_NAME_RE.fullmatch(self.command):  # a method is a token
                abort(400, f"Bad request method ({self.command!r})")
            self.headers = read_header_fields(self.rfile)
        except HTTPError as e:
            self.send_error(e.status, e.reason)
            return False
        connection = self.headers.get("Connection", "").lower()
        if connection in ("close", "keep-alive"):
            self.close_connection = connection == "close"
        return True

    def _declared_length(self):
        """The body's declared length; -1 if chunked or malformed. Two different
        lengths are malformed: a proxy in front may have trusted the other one."""
        if self.headers.get("Transfer-Encoding"):
            return -1
        values = {value.strip() for value in self.headers.get_all("Content-Length", ["0"])}
        length = bounded_decimal(values.pop(), MAX_BODY_BYTES + 1) if len(values) == 1 else None
        return -1 if length is None else length  # above MAX_BODY_BYTES: a 413

    def _read_body(self):
        """The request body, checked against its declared length before it is read.
        `100 Continue` is sent only here, so that a refused body (401, 411, 413) is
        never sent."""
        length = self.body_length
        if length < 0 and self.headers.get("Transfer-Encoding"):
            abort(411, "Send the body with a Content-Length.")
        if length < 0:
            abort(400, "Bad Content-Length.")
        if length > MAX_BODY_BYTES:
            abort(413, f"Body too large: at most {MAX_BODY_BYTES} bytes.")
        if not self.server.body_budget.reserve(length):  # before a byte of it is read
            abort(503, "Too many request bodies are arriving at once; try again in a "
                       "few seconds.", {"Retry-After": str(BODIES_RETRY_AFTER_S)})
        self.body_reserved = length
        if (self.headers.get("Expect", "").lower() == "100-continue"
                and self.request_version != "HTTP/1.0"):
            self.send_response_only(100)
            self.end_headers()
            self.wfile.flush()  # left in the write buffer, it would stall curl a second
        self.stream.expect_head(self.head_timeout)  # in all, as the head
        try:
            body = self.rfile.read(length)
        except (TimeoutError, socket.timeout):
            abort(408, "Timed out reading the body.")
        finally:
            self.stream.head_done()
        if len(body) < length:
            abort(400, "Body shorter than its Content-Length.")
        self.body_pending = False
        return body

    def _wants(self, kind):
        """Whether the client asked for `json`, `html` or `text` (format=, then Accept)."""
        accept = accepted_types(self.headers.get("Accept", ""))
        if "application/json" in accept:
            return kind == "json"
        if self.command in ("GET", "HEAD"):
            fmt = self.query_values.get("format")
            if fmt in ("json", "html", "text"):
                return kind == fmt
        # A page only for what a browser loads: its relative links are a task's.
        return kind == "html" and self.command in ("GET", "HEAD") and "text/html" in accept

    def _preferred_wait(self):
        """N of `Prefer: wait=N` (RFC 7240), at most MAX_WAIT_S; None if not asked."""
        return preferred_wait(self.headers.get_all("Prefer", []))

    def _query_flag(self, key):
        """Whether a query parameter is set to something other than 0."""
        return self.query_values.get(key) not in (None, "", "0")

    def _query_value(self, key):
        """A query parameter's last value ("" when it is given empty), or None."""
        return self.query_values.get(key)

    def _query_number(self, key, default, least, most=None):
        """A whole-number query parameter from `least` to `most`, or a 400 naming it."""
        value = self._query_value(key)
        if value is None:
            return default
        # Without a `most`, a larger number is as good as 18 digits: past every end.
        top, ceiling = (most, most + 1) if most is not None else (10 ** 18 - 1,) * 2
        number = bounded_decimal(value, ceiling)
        if number is None or not least <= number <= top:
            bounds = f"from {least} to {most}" if most is not None else f"{least} or more"
            abort(400, f"Bad {key} parameter: give a whole number, {bounds}.")
        return number

    def _list_url(self, **query):
        """A relative URL of the list, keeping this request's limit and format."""
        kept = {key: self._query_value(key) for key in ("limit", "format")}
        query.update((key, value) for key, value in kept.items() if value)
        return "tasks?" + urllib.parse.urlencode(query) if query else "tasks"

    # -- authorization --

    def _refuse_browser_attacks(self, authority):
        """403 for what a web page could make a browser send: a Host that is not this
        daemon's (DNS rebinding), or a cross-site POST or DELETE (request forgery).
        `authority`: an absolute-form target's, which stands for the Host header."""
        hosts = self.headers.get_all("Host", [])
        if len(hosts) > 1:
            abort(400, "More than one Host header.")  # RFC 9112 section 3.2
        host = authority if authority is not None else hosts[0] if hosts else ""
        name = host_name(host) if host else ""
        if host and not (HOST_RE.fullmatch(host) and name  # "[::1", ":80", "..": no name
                         and (not host.startswith("[") or is_ipv6_address(name))):
            abort(400, f"Bad host {host!r}: give a name or an address, and perhaps a port.")
        if name and not (is_loopback_name(name) or name in self.server.allowed_hosts):
            abort(403, f"Host {name!r} is not this daemon's name (DNS rebinding?); if it is, "
                       f"start Task Train with --allow-host {name}.")
        if self.command in ("GET", "HEAD", "OPTIONS"):
            return
        fetch_site = self.headers.get("Sec-Fetch-Site")
        origin = self.headers.get("Origin")
        if fetch_site is not None:
            cross_site = fetch_site.strip().lower() not in SAME_SITE_FETCHES
        else:  # an older browser: judged by its Origin
            cross_site = origin is not None and not self._is_own_origin(origin, host)
        if cross_site:
            abort(403, "Cross-site request refused: another web site's page may not "
                       "submit or cancel tasks.")

    def _is_own_origin(self, origin, host):
        """Whether an Origin header names the Host the request was sent to, or a name
        given with --allow-host: a proxy in front may send its own Host, or drop the
        port from the browser's (nginx's $host)."""
        match = ORIGIN_RE.fullmatch(origin.strip())  # `null`, or no origin at all: not own
        netloc = match[1].lower() if match else ""
        return bool(netloc) and (netloc == host.strip().lower()
                                 or host_name(netloc) in self.server.proxy_hosts)

    def _refuse_multipart(self):
        """415 for a multipart body (curl -F): its parts would reach the scripts as one
        opaque blob."""
        if media_type(self.headers).startswith("multipart/"):
            abort(415, f"A multipart body is not accepted: send {FORM_TYPE} (curl "
                       "--data-urlencode) or a raw body such as application/json.")

    def _authorize(self, path, method):
        """401 unless the request carries what --token and --secret ask for; True if
        it still has to show a webhook signature, checked once the body is read."""
        token, secret = self.server.token, self.server.secret
        if (path == "/" and method == "GET") or (token and self._has_token(token)):
            return False
        if secret and method == "POST" and path == "/task":
            gitlab = self.headers.get("X-Gitlab-Token")
            if gitlab is not None and same_secret(header_bytes(gitlab), secret):
                return False
            if any(map(self.headers.get, SIGNATURE_HEADERS)):
                return True
            unauthorized("Bad X-Gitlab-Token." if gitlab is not None
                         else "Bad token, and no webhook signature." if token
                         and self.headers.get("Authorization")
                         else "Missing token or webhook signature." if token
                         else "Missing webhook signature.")
        if token:
            unauthorized()
        return False

    def _has_token(self, token):
        """Whether the request carries the token, as Bearer or as a Basic password."""
        scheme, _, credentials = self.headers.get("Authorization", "").strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer":
            return same_secret(header_bytes(credentials), token)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True)
            except ValueError:
                return False
            return same_secret(decoded.partition(b":")[2], token)
        return False

    def _webhook_key(self, signed):
        """The sha256 of what the request's signature covers (or of its body, for
        GitLab's token) if the webhook secret alone let it in, else None: a replay is
        found by it."""
        token = self.server.token
        if not self.server.secret or (token and self._has_token(token)):
            return None
        return hashlib.sha256(signed).hexdigest()

    def _check_signature(self, body):
        """The bytes the request's GitHub, Gitea or Gogs HMAC-SHA256 signature covers, or
        401: the body as sent, or the payload of a forge event's form that holds nothing
        else. Gitea, Forgejo and Gogs sign the payload, not the form they send it in;
        that payload is then the scripts' stdin, as signed."""
        github = self.headers.get("X-Hub-Signature-256", "")
        gitea = self.headers.get("X-Gitea-Signature") or self.headers.get("X-Gogs-Signature", "")
        given = header_bytes((github[len("sha256="):] if github.startswith("sha256=")
                              else gitea).strip().lower())
        signed = [body]
        if media_type(self.headers) == FORM_TYPE and forge_headers(self.headers):
            signed.append(lone_payload_field(body))
        for candidate in signed:
            if given and candidate is not None and same_secret(given, hmac.new(
                    os.fsencode(self.server.secret), candidate, hashlib.sha256).hexdigest()):
                return candidate
        unauthorized("Bad webhook signature.")

    # -- routes --

    def home(self):
        """GET /: the original's health check."""
        if self._wants("json"):
            self._send(200, JSON, json_bytes({"message": "Task Manager is running!",
                                              "version": __version__}))
        else:
            self._send(200, TEXT, b"Task Manager is running!")

    def submit(self):
        """POST /task: queue a task; or find the identical pending one, or the task
        that a signed body sent again (a replay) first queued."""
        wait = self._queue()  # returned, it holds the body no more
        if wait:
            self._release_body()  # or a wait would keep the body's share of the budget
            self._show_outcome(*wait)

    def _queue(self):
        """Read the body and queue the task it names, answering unless the answer is
        to wait for the task's end: then (task id, seconds, headers) for _show_outcome."""
        body = self._read_body()
        signed = self._check_signature(body) if self.needs_signature else body
        webhook_key = self._webhook_key(signed)
        replayed = webhook_key and self.server.store.webhook_task(webhook_key)
        if replayed:  # whatever the URL says: it is not signed
            log.info("task %s: its webhook body came again; nothing queued", replayed.task.id)
            return self._send_submitted(*replayed)
        forge = forge_event(self.headers, body, None if signed is body else signed)
        pairs = list(self.query)
        if webhook_key:
            refuse_unsigned_params(pairs)
        event = None
        if forge:
            event, body = forge
        elif media_type(self.headers) == FORM_TYPE:
            pairs += parse_form(body)
            body = b""
        params = dict(pairs)
        name = params.pop("name", None)
        if name is None or not NAME_RE.fullmatch(name):
            abort(400, "Bad or missing name parameter.")
        check_params(params)
        shown_folder = os.path.join(self.server.shown_scripts_dir, name)
        folders = self.server.task_folders
        scan = folders.scan(name)
        if not scan.scripts(first_only=True):
            abort(404, f"No task named {name!r}: {shown_folder}/ holds no executable script.")
        try:
            settings = folders.settings(name)
        except SettingsError as e:
            abort(500, str(e))
        if event and self._answer_unqueued_event(event, name, settings, shown_folder):
            return None
        try:
            submitted = self.server.store.submit(
                name, params, body, on_claimed=self.server.runner.hand_over, event=event,
                webhook_key=webhook_key, supersede=settings.supersede)
        except QueueFull:
            abort(503, f"The queue is full: {MAX_PENDING} tasks are pending; try again later.",
                  {"Retry-After": str(RETRY_AFTER_S)})
        return self._send_submitted(*submitted)

    def _answer_unqueued_event(self, event, name, settings, shown_folder):
        """Answer a ping, or an event the task's settings do not accept, queueing
        nothing; False if the event is to be queued."""
        if event.event == "ping":  # GitHub's, when a webhook is created
            self._send_line(200, f"Ping received: this webhook can start task {name!r}; "
                                 "nothing queued.", field="message")
            return True
        if settings.events is not None and event_name(event.event) not in settings.events:
            accepted = ", ".join(sorted(settings.events))
            self._send_line(202, f"Event {event_name(event.event)!r} ignored: {shown_folder}/"
                                 f"{SETTINGS_FILE} accepts only {accepted}; nothing queued.",
                            field="message")
            return True
        return False

    def _send_submitted(self, task, is_new, position, synced, handed_to_runner=None):
        """Answer a submission with the task's record, once the task is on disk; with
        `Prefer: wait`, answer nothing yet: (task id, seconds, headers) of the wait."""
        wait_s = self._preferred_wait()
        # An idle runner waits for this thread's fsync, then for the interpreter lock
        # while the record is made: made first, it takes the lock while the runner
        # wakes instead (a task's start came 0.1 ms sooner).
        early = None
        if is_new and handed_to_runner and wait_s is None:
            early = self._new_record(task, position)
        synced()  # a 2xx promises the task is on disk; this also commits it (see submit)
        if wait_s is not None:
            return task.id, wait_s, {"Location": "tasks/" + task.id}
        if not is_new:  # found (pending, or ended for a replayed webhook): as it stands
            self._send_task(task, 200, {"Location": "tasks/" + task.id})
            return None
        content_type, record = early or self._new_record(task, position)
        # Made into the write buffer now, while the runner wakes; it leaves at the flush
        # after the wait (a record past WRITE_BUFFER_BYTES leaves sooner, the same).
        self._send(201, content_type, record, {"Location": "tasks/" + task.id})
        if handed_to_runner:
            self.server.runner.wait_started(handed_to_runner, HANDED_OVER_WAIT_S)

    def _new_record(self, task, position):
        """(content type, body) of the answer to a submission that queued `task`."""
        if self._wants("json"):
            fields = task_fields(task, self.server.shown_scripts_dir, position)
            return JSON, json_bytes(dict(fields, output=""))
        return TEXT, (render_record_head(task, self.server.shown_scripts_dir) + "\n").encode()

    def list_tasks(self):
        """GET /tasks: a page of the list (the newest 100; ?before=ID, ?limit=N) as HTML,
        JSON or text records, with a link to the next, older, page."""
        store, shown = self.server.store, self.server.shown_scripts_dir
        before = self._query_value("before")
        if before is not None and not re.fullmatch(ID_RE, before):
            abort(400, "Bad before parameter: give a task ID (13 hex digits).")
        limit = self._query_number("limit", LIST_PAGE_TASKS, 1, MAX_LIST_PAGE_TASKS)
        tasks, more = store.newest_page(before, limit)
        older = self._list_url(before=tasks[-1].id) if more else None
        headers = {"Link": f'<{older}>; rel="next"'} if older else None
        if self._wants("json"):
            self._send_chunks(200, JSON, render_json_list(tasks, shown, store.position),
                              headers=headers)
        elif self._wants("text"):
            self._send_chunks(200, TEXT, render_records(tasks, shown, store.log_path),
                              headers=headers)
        else:
            newest = self._list_url() if before else None
            page = render_list_html(tasks, store.pending_count(), store.busy(),
                                    now_us(), store.position, older, newest)
            self._send(200, HTML, page.encode(), headers)

    def get_task(self, task_id):
        """GET /tasks/ID: the record; with `Prefer: wait=N`, once the task has ended."""
        wait_s = self._preferred_wait()
        if wait_s is None:
            self.show_task(task_id)
        else:
            self._show_outcome(self._ended_task(task_id).id, wait_s)

    def show_task(self, task_id):
        """The record, as text, JSON or a live HTML page."""
        self._send_task(self._task(task_id))

    def _send_task(self, task, status=200, headers=None):
        """Send this snapshot's record, as text, JSON or a live HTML page."""
        task_id, shown = task.id, self.server.shown_scripts_dir
        if self._wants("json"):
            fields = task_fields(task, shown, self.server.store.position(task_id))
            with self._open_log(task_id) as f:
                self._send_chunks(status, JSON, render_task_json(fields, f), headers=headers)
        elif self._wants("html"):
            with self._open_log(task_id) as f:
                start = max(0, os.fstat(f.fileno()).st_size - HTML_TAIL_BYTES)
                f.seek(start)
                tail = f.read(HTML_TAIL_BYTES)
            page = render_task_html(task, shown, tail, start, now_us(),
                                    self.server.store.position(task_id))
            self._send(status, HTML, page.encode(), headers)
        else:
            head = render_record_head(task, shown).encode()
            with self._open_log(task_id) as f:
                self._send_file(status, TEXT, f, head, b"\n", headers)

    def _show_outcome(self, task_id, wait_s, headers=None):
        """The record once the task has ended, or `wait_s` has passed, or the daemon
        stops: 200 complete, 424 failed or cancelled, 202 not ended yet."""
        deadline = time.monotonic() + wait_s
        while not self.server.runner.wait_finished(
                task_id, max(0, min(WAIT_CLIENT_CHECK_S, deadline - time.monotonic()))):
            if self._client_gone():
                self.close_connection = True
                return
            if time.monotonic() >= deadline:
                break
        task = self._ended_task(task_id)  # one snapshot: the status and the record agree
        self._send_task(task, OUTCOME_STATUS.get(task.status, 202),
                        {**(headers or {}), "Preference-Applied": f"wait={wait_s}"})

    def _client_gone(self):
        """Whether the client has closed its end of the connection (a request it sent
        after this one, pipelined, stays unread)."""
        try:
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:  # reset
            return True

    def show_log(self, task_id):
        """GET /tasks/ID/log: the raw output, from byte ?from=N on (0); ?follow=1
        streams it to the task's end. A follow that comes after --keep 0 pruned the
        task as it ended gets what is left: nothing (its outcome is a wait's)."""
        self._ended_task(task_id)
        start = self._query_number("from", 0, 0)
        if self._wants("json"):  # JSON on every route: the task, output included
            self.show_task(task_id)
        elif self._query_flag("follow"):
            self._send_chunks(200, TEXT, self._follow(task_id, start), live=True)
        else:
            with self._open_log(task_id) as f:
                f.seek(min(start, os.fstat(f.fileno()).st_size))  # no further: see _follow
                self._send_file(200, TEXT, f)

    def _follow(self, task_id, start=0):
        """The log as it is written, from byte `start` on: waits while the task is
        pending, ends when it ends or when the daemon stops."""
        path, store, f = self.server.store.log_path(task_id), self.server.store, None
        looked = time.monotonic()
        try:
            while True:
                # A client that left is found when a chunk cannot be sent; while none
                # comes (a pending task, a quiet script) it is looked for, or its thread
                # and socket were held for as long as the task took.
                if time.monotonic() - looked >= WAIT_CLIENT_CHECK_S:
                    looked = time.monotonic()
                    if self._client_gone():
                        self.close_connection = True
                        return
                # Both are read before the log, so that the last read has every line.
                status, stopping = store.status(task_id), self.server.shutting_down.is_set()
                if f is None and os.path.exists(path):
                    f = open(path, "rb")
                # Not sought to before the log reaches it: past the largest file its
                # file system holds (16 TiB on ext4), a seek fails.
                if f and f.tell() < start < os.fstat(f.fileno()).st_size:
                    f.seek(start)
                if f and f.tell() >= start:
                    yield from read_chunks(f)
                if status is None or status in FINISHED or stopping:
                    return
                time.sleep(FOLLOW_POLL_S)
        finally:
            if f:
                f.close()

    def cancel_task(self, task_id):
        """DELETE /tasks/ID: a pending task never runs; a running one is stopped."""
        store, runner = self.server.store, self.server.runner
        task = self._ended_task(task_id)  # one --keep 0 pruned as it ended is a 409 too
        if task.status not in FINISHED:
            task = store.cancel_pending(task_id) or self._ended_task(task_id)
            if task.status == "running":
                ended = runner.stop(task_id, "cancelled", CANCELLED_RUNNING)
                if ended in (None, "cancelled"):  # on its way, or a stop did reach a script
                    runner.wait_finished(task_id, runner.stop_wait_s(), or_unrecorded=True)
                    ended = runner.scripts_ended(task_id)  # None: they have not yet
                unwritable = runner.end_unwritable(task_id)
                # A task pruned by the commit that ended it (--keep 0) as it ended.
                task = store.ended(task_id) or not_found()
                if task.status == "running" and ended not in (None, "cancelled"):
                    abort(409, ENDED_NOT_RECORDED[runner.after_scripts(task_id)].format(
                        task_id, ended))
                if task.status == "running" and ended == "cancelled" and not unwritable:
                    # Stopped, but its .on-finish outlasted the wait: the record as it is.
                    return self._send_task(task, 202)
            if task.status == "cancelled":  # by this request, or one racing with it
                return self._send_task(task)
        if task.status in FINISHED:  # also one whose last script exited before the stop came
            abort(409, f"Task {task_id} has already finished ({task.status}).")
        abort(503, f"Task {task_id} was told to stop, but its end is not recorded yet (the "
                   "task store cannot be written, or its processes are slow to stop); "
                   "try again later.",
              {"Retry-After": str(RETRY_AFTER_S)})

    # -- helpers --

    def _task(self, task_id):
        """The task with this id, or a 404."""
        task = self.server.store.get(task_id)
        if task is None:
            not_found()
        return task

    def _ended_task(self, task_id):
        """The task with this id, or as it ended if --keep 0 pruned it then (what a wait
        for it answers), or a 404."""
        return self.server.store.ended(task_id) or not_found()

    def _release_body(self):
        """Give the body's share of the server's body budget back (once)."""
        self.server.body_budget.release(self.body_reserved)
        self.body_reserved = 0

    def _open_log(self, task_id):
        """The task's log file to read, or an empty stand-in before it has one."""
        return open_log_to_read(self.server.store.log_path(task_id))

    # -- sending: every response leaves through _send, _send_file or _send_chunks --

    def _start(self, status, content_type, headers):
        """Status line and the headers every answer has."""
        self.sent = True
        self.request_no = next(self.server.request_counter)
        if self.body_pending:  # an unread body would be taken for the next request
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("X-Req-Count", str(self.request_no))
        self.send_header("Vary", "Accept")  # every answer, errors too, can be JSON
        # A log is the scripts' text, HTML and all: no browser may take it for a page.
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":  # it asked to stay open: say it does
            self.send_header("Connection", "keep-alive")

    def _send(self, status, content_type, body, headers=None):
        """Send a whole body with its Content-Length."""
        self._start(status, content_type, headers)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_file(self, status, content_type, f, head=b"", tail=b"", headers=None):
        """Send a file's bytes from where it stands to its end as it is now, from disk,
        between head and tail."""
        size = max(0, os.fstat(f.fileno()).st_size - f.tell())
        self._start(status, content_type, headers)
        self.send_header("Content-Length", str(len(head) + size + len(tail)))
        self.end_headers()
        if self.command == "HEAD":
            return
        self.wfile.write(head)
        while size > 0:
            chunk = f.read(min(size, COPY_CHUNK_BYTES))
            if not chunk:  # the file shrank: keep the promised length
                chunk = b" " * min(size, COPY_CHUNK_BYTES)
            self.wfile.write(chunk)
            size -= len(chunk)
        self.wfile.write(tail)

    def _send_chunks(self, status, content_type, chunks, live=False, headers=None):
        """Send a body of unknown length: chunked, or closed at its end for HTTP/1.0.

        `live` sends each chunk as it comes; otherwise the write buffer gathers them.
        """
        chunked = self.request_version != "HTTP/1.0"
        if not chunked:
            self.close_connection = True
        headers = {**(headers or {}), **({"Transfer-Encoding": "chunked"} if chunked else {})}
        self._start(status, content_type, headers)
        self.end_headers()
        self.wfile.flush()  # a follower sees the answer start before the output does
        if self.command == "HEAD":
            return
        for chunk in chunks:
            if not chunk:
                continue
            if chunked:
                self.wfile.write(b"%x\r\n" % len(chunk))
            self.wfile.write(chunk)
            if chunked:
                self.wfile.write(b"\r\n")
            if live:
                self.wfile.flush()
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _send_line(self, status, line, headers=None, field="error"):
        """Send a one-line answer (an error's reason; a note's, with field="message"),
        as JSON if the Accept header asks for it: the head may not be parsed."""
        if self.headers is not None and "application/json" in accepted_types(
                self.headers.get("Accept", "")):
            self._send(status, JSON, json_bytes({field: line}), headers)
        else:
            end = b"" if line == NOT_FOUND else b"\n"  # the original's exact answer
            self._send(status, TEXT, line.encode() + end, headers)

    def send_error(self, code, message=None, explain=None):
        """The base class's answer to a malformed request, as a one-line plain text."""
        self.close_connection = True
        if not self.request_version or self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # or no status line would be sent
        reason = message or self.responses.get(code, ("Bad request",))[0]
        self._send_line(code, reason.replace("\r", " ").replace("\n", " "))

    _date = (None, "")  # (second, the Date header's value for it)

    def date_time_string(self, timestamp=None):
        """The Date header's value, made once a second rather than for every answer
        (formatdate took ~4% of a submission's CPU). A tuple replaces a tuple: no lock."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        second = int(time.time())
        date = Handler._date
        if date[0] != second:
            date = Handler._date = (second, super().date_time_string(second))
        return date[1]

    def log_request(self, code="-", size="-"):
        """Log refused requests only: the task list is the record of the accepted ones
        (a 424 is the outcome of a task waited for, not a refusal)."""
        if int(code) >= 400 and int(code) != OUTCOME_STATUS["failed"]:
            log.warning("%s %r %s", self.address_string(), self.requestline, int(code))

    def log_message(self, format, *args):
        """The base class's own messages (timeouts, say) go to the daemon's log."""
        log.info("%s %s", self.address_string(), format % args)

    def log_error(self, format, *args):
        """As log_message, but for the base class's timeout of a connection that had
        not begun a request (an idle keep-alive, a browser's spare connection): that
        one is closed without a word."""
        idle = format.startswith("Request timed out") and not self.stream.head_cut_short
        if not idle:
            self.log_message(format, *args)


class TaskTrainServer(http.server.ThreadingHTTPServer):
    """The HTTP server; it owns the store and the runner that handlers reach."""

    daemon_threads = True
    # The default backlog of 5 drops connections when many clients submit at once.
    request_queue_size = 128

    def __init__(self, address, store, runner, token=None, secret=None, allowed_hosts=()):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.store = store
        self.runner = runner
        self.scripts_dir = runner.scripts_dir
        self.shown_scripts_dir = runner.shown_scripts_dir
        self.task_folders = TaskFolders(self.scripts_dir, self.shown_scripts_dir)
        self.token = token
        self.secret = secret
        # Host names besides loopback ones that reach this daemon: --host, --allow-host;
        # and those a proxy in front serves its pages under: --allow-host.
        self.proxy_hosts = frozenset(map(host_name, allowed_hosts))
        self.allowed_hosts = self.proxy_hosts | {host_name(address[0])}
        self.request_counter = itertools.count(1)
        self.body_budget = ByteBudget(MAX_BODIES_HELD_BYTES)
        # Set once the runner has stopped: follow streams then send what is left of
        # their log, and end the answer properly instead of being cut off at exit.
        self.shutting_down = threading.Event()
        self._answers = 0  # requests being answered
        self._answers_changed = threading.Condition()
        self._out_of_fds = False  # main thread only: accept() last failed for want of fds
        super().__init__(address, Handler)

    def serve_until_signalled(self, stop_reader):
        """Accept connections until the number of a stop signal arrives on
        `stop_reader`, and return it.

        One select() waits for both, so a stop is seen at once and an idle daemon
        never wakes; serve_forever() polls to notice shutdown(), which took 50 ms
        of every stop at the interval it needed.
        """
        keep_thread_on_one_cpu()  # and so every handler thread started from here
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(stop_reader, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is stop_reader:
                        return stop_reader.recv(1)[0]
                    self._handle_request_noblock()  # what serve_forever() calls

    def get_request(self):
        """Accept a connection. With no file descriptor left, the listening socket stays
        ready, and the accept loop spun a CPU without a word: it pauses, and says so."""
        try:
            accepted = super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                if not self._out_of_fds:
                    log.error("cannot accept connections: %s; trying again every %g s",
                              e.strerror, ACCEPT_RETRY_S)
                self._out_of_fds = True
                time.sleep(ACCEPT_RETRY_S)
            raise
        if self._out_of_fds:
            log.info("accepting connections again")
            self._out_of_fds = False
        return accepted

    def handle_error(self, request, client_address):
        """A client that left is no error; anything else goes to the log, once."""
        if not isinstance(sys.exc_info()[1], CLIENT_GONE):
            log.exception("error on a connection from %s", client_address[0])

    @contextlib.contextmanager
    def answering(self):
        """Count a request while it is answered, so that a stop can wait for it."""
        with self._answers_changed:
            self._answers += 1
        try:
            yield
        finally:
            with self._answers_changed:
                self._answers -= 1
                self._answers_changed.notify_all()

    def end_answers(self, timeout_s):
        """Tell follow streams to end, and wait a while for every answer under way."""
        self.shutting_down.set()
        with self._answers_changed:
            self._answers_changed.wait_for(lambda: self._answers == 0, timeout_s)


# ----------------------------------------------------------------------------
# CLI and main
# ----------------------------------------------------------------------------

def parse_args(argv):
    """The options, checked; argparse exits 2 on bad ones."""
    parser = argparse.ArgumentParser(
        prog="tasktrain.py",
        description="A sequential script runner with a teensy REST API.",
        epilog="As a client of a running daemon: tasktrain.py {submit,status,log,cancel,list} "
               "... (each with --help).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--scripts-dir",
                        help="where the task folders are (default: scripts.d beside tasktrain.py)")
    parser.add_argument("--state-dir",
                        help="task database and logs (default: state beside tasktrain.py)")
    parser.add_argument("--keep", type=non_negative(int), default=DEFAULT_KEEP,
                        help="finished tasks kept (default: %(default)s)")
    parser.add_argument("--timeout", type=seconds_option, default=0,
                        help="seconds a task may run before it is killed; 0: no limit")
    parser.add_argument("--grace", type=seconds_option, default=DEFAULT_GRACE_S,
                        help="seconds from SIGTERM to SIGKILL when a task is stopped "
                             "(default: %(default)g)")
    parser.add_argument("--token", default=os.environ.get("TASKTRAIN_TOKEN"),
                        help="secret every request but GET / must carry (env TASKTRAIN_TOKEN)")
    parser.add_argument("--secret", default=os.environ.get("TASKTRAIN_SECRET"),
                        help="webhook secret: GitHub/Gitea signatures, GitLab token "
                             "(env TASKTRAIN_SECRET)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a Host name the daemon answers besides loopback ones and "
                             "--host, such as a reverse proxy's (repeatable)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without --token")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    if argv[:1] and not argv[0].startswith("-"):  # a client command, mistyped
        parser.error(f"no command {argv[0]!r}: the commands are {', '.join(CLIENT_COMMANDS)}; "
                     "without one, the daemon runs")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    if not (is_loopback_name(args.host) or args.token or args.insecure):
        parser.error(f"--host {args.host} is not a loopback address: anyone who reaches it "
                     "could run your scripts. Set --token (or TASKTRAIN_TOKEN), "
                     "or pass --insecure if a firewall already guards it.")
    return args


def non_negative(kind):
    """An argparse type: `kind`, refusing negative values."""
    def convert(text):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative: {text}")
        return value
    convert.__name__ = kind.__name__
    return convert


def seconds_option(text):
    """An argparse type: seconds, from 0 to MAX_SECONDS."""
    seconds = float(text) if SECONDS_RE.fullmatch(text) else -1.0
    if not 0 <= seconds <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"give a number of seconds from 0 to {MAX_SECONDS}, "
                                         f"not {text}")
    return seconds


def catch_stop_signals():
    """A socket pair whose first end receives the number of each SIGTERM, SIGINT or
    SIGHUP (the terminal it was started from closed: by default it killed the daemon
    at once, and left the running task's scripts unwatched), unless SIGHUP is ignored
    already (`nohup`), as it then stays, for the scripts too.

    The kernel may deliver a signal to any thread, and then a main thread blocked on
    a lock never wakes; the wakeup fd is written from whichever thread caught it.
    """
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno())
    hup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    for signum in (signal.SIGTERM, signal.SIGINT) + hup:
        signal.signal(signum, lambda *_: None)
    return reader, writer  # the writer must stay open as long as the handlers are set


def keep_thread_on_one_cpu():
    """Keep the calling thread, and the threads it starts from now on, on one of the
    CPUs the daemon may use (Linux; elsewhere nothing).

    Handler threads take turns with the interpreter lock (in a build that has one),
    so more CPUs give them nothing; but handing the lock to a thread asleep on
    another CPU wakes that CPU, which in a VM goes through the host. With 16 clients
    submitting at once, handlers kept on one CPU took 1,000 tasks in 0.37 s instead
    of 0.57 s. The last CPU: the first often takes more of the kernel's own work, and
    on it a submission to an idle daemon started its task 0.24 ms later (3.40 ms
    against 3.16). The runner, started before, stays free: its scripts get every CPU
    it has.
    """
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ()
    if len(cpus) > 1:
        with contextlib.suppress(OSError):  # a cgroup may forbid it: it is only faster
            os.sched_setaffinity(0, {max(cpus)})


class Unreachable(Exception):
    """The daemon cannot be reached, or broke off its answer."""


class Refused(Exception):
    """The daemon refused the request; str() is its one-line reason."""


class Client:
    """A running daemon's API, over http.client, for the command line."""

    def __init__(self, url, token=None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url must be http://HOST[:PORT][/PREFIX], not {url!r}")
        if parts.username is not None:  # it would not be sent
            raise ValueError("--url must hold no user or password: the token goes in "
                             "TASKTRAIN_TOKEN")
        if parts.port == 0:  # reading it raises ValueError for a port out of range
            raise ValueError(f"--url names port 0: {url!r}")
        self.url = url
        self.parts = parts
        self.prefix = parts.path.rstrip("/")
        self.token = token

    def send(self, method, path, body=None, headers=None, timeout_s=ANSWER_TIMEOUT_S):
        """Send a request; returns its connection, to read the answer from with
        `answer`. `timeout_s`: None for an answer that may take as long as a task (a
        wait or a follow)."""
        https = self.parts.scheme == "https"
        connection = http.client.HTTPSConnection if https else http.client.HTTPConnection
        headers = dict(headers or {})
        if self.token:  # as bytes: http.client sends a str as Latin-1
            headers["Authorization"] = b"Bearer " + os.fsencode(self.token)
        try:
            port = self.parts.port
            conn = connection(self.parts.hostname, port, timeout=CONNECT_TIMEOUT_S)
            conn.connect()
            conn.sock.settimeout(timeout_s)
            conn.request(method, self.prefix + path, body=body, headers=headers)
            return conn
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise Unreachable(f"cannot reach Task Train at {self.url}: {e}") from None

    def answer(self, conn):
        """The http.client response to the request sent on `conn`, its body not yet read."""
        try:
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(f"cannot reach Task Train at {self.url}: {e}") from None

    def open(self, method, path, body=None, headers=None, timeout_s=ANSWER_TIMEOUT_S):
        """Send a request; returns the http.client response, its body not yet read."""
        return self.answer(self.send(method, path, body, headers, timeout_s))

    def call(self, method, path, body=None, headers=None, timeout_s=ANSWER_TIMEOUT_S):
        """Send a request; returns (status, headers, body as text)."""
        return self.read(self.open(method, path, body, headers, timeout_s))

    def read(self, resp):
        """A response's (status, headers, body as text), once `checked`."""
        self.checked(resp)
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(f"Task Train at {self.url} broke off its answer: {e}") from None
        return resp.status, resp.headers, data.decode("utf-8", "replace")

    def checked(self, resp):
        """`resp` if Task Train sent it (every answer of its carries X-Req-Count);
        Unreachable if anything else did: a proxy in front that cannot reach it (502,
        504), or a web server at a wrong --url. Its 404 page would read as a refusal,
        its 200 as a task queued."""
        if "X-Req-Count" not in resp.headers:
            why = ("cannot reach Task Train at" if resp.status in (502, 504) else
                   "what answers is not Task Train at")
            raise Unreachable(f"{why} {self.url}: {resp.status} {resp.reason}")
        return resp

    def copy(self, path, out):
        """Stream a path's answer (a log) to a binary file as it comes."""
        resp = self.checked(self.open("GET", path, timeout_s=None))
        if resp.status != 200:
            raise Refused(self.read(resp)[2].strip())
        try:
            for chunk in iter(functools.partial(resp.read1, COPY_CHUNK_BYTES), b""):
                try:
                    out.write(chunk)
                    out.flush()
                except BrokenPipeError:  # read on to the end all the same, for the outcome
                    stdout_gone()
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(f"Task Train at {self.url} broke off the log: {e}") from None

    def send_outcome_wait(self, task_id):
        """Send a wait for the task's end; returns the connection (see answered_outcome)."""
        return self.send("GET", f"/tasks/{task_id}", headers={"Prefer": f"wait={MAX_WAIT_S}"},
                         timeout_s=None)

    def outcome(self, task_id):
        """The task's record once it has ended (waiting as long as it takes)."""
        while True:
            resp = self.answer(self.send_outcome_wait(task_id))
            if resp.status == 504 and "X-Req-Count" not in resp.headers:
                # A proxy in front gave up waiting first: ask again.
                with contextlib.suppress(OSError, http.client.HTTPException):
                    resp.read()
                continue
            status, _, record = self.read(resp)
            if status in OUTCOME_STATUS.values():  # it has ended
                return record
            if status != 202:  # 202: not ended within the wait, or the daemon is stopping
                raise Refused(record.strip())  # 404, 401: not an outcome to exit 0 with

    def answered_outcome(self, conn):
        """The record that answers a wait sent on `conn` if it is an outcome, else None
        (the wait ran out, a proxy gave up on it, the connection was lost). Read once
        the task has ended or the daemon is stopping: the answer is due at once."""
        if conn.sock:
            conn.sock.settimeout(ANSWER_TIMEOUT_S)
        try:
            status, _, record = self.read(self.answer(conn))
        except Unreachable:
            return None
        return record if status in OUTCOME_STATUS.values() else None


def stdout_gone():
    """Send the rest of stdout to /dev/null: what read it has stopped (`... | head`).
    The command goes on, so that its exit status still says how the task went."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def write_out(text):
    """Write `text` to stdout, unless what read it has stopped."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_gone()


def record_field(record, label):
    """A field of a text record's head ('ID', 'STATUS', ...), or None."""
    for line in record.split("\n", 6)[:6]:
        if line.startswith(label + ":"):
            return line[9:]
    return None


def record_status(record):
    """The STATUS of a text record."""
    return record_field(record, "STATUS")


def outcome_exit(record):
    """The exit status a task's end gives: 0 complete, 1 failed or cancelled."""
    return EXIT_COMPLETE if record_status(record) == "complete" else EXIT_FAILED


def key_value(text):
    """An argparse type: KEY=VALUE as a (key, value) pair."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if key == "name":  # the daemon would take the last name given: another task
        raise argparse.ArgumentTypeError(f"{text!r}: NAME names the task; name cannot "
                                         "be a parameter")
    return key, value


def client_parsers():
    """One argparse parser per client command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("TASKTRAIN_URL", DEFAULT_URL),
                        help="the daemon (default: env TASKTRAIN_URL, else %(default)s); "
                             "the token comes from env TASKTRAIN_TOKEN")
    parsers = {}
    for command, summary in (("submit", "queue a task"), ("status", "show a task's record"),
                             ("log", "show a task's output"), ("cancel", "cancel a task"),
                             ("list", "list the tasks, newest first")):
        parsers[command] = argparse.ArgumentParser(
            prog="tasktrain.py " + command, parents=[common], description=summary + ". "
            "Exit status: 0 complete (or done), 1 failed or cancelled, 2 usage error or "
            "refused (the reason on stderr), 3 the daemon cannot be reached.")
        if command in ("status", "log", "cancel"):
            parsers[command].add_argument("task_id", metavar="ID")
    submit = parsers["submit"]
    submit.add_argument("name", metavar="NAME")
    submit.add_argument("params", metavar="KEY=VALUE", nargs="*", type=key_value)
    submit.add_argument("--follow", action="store_true",
                        help="stream the task's output until it ends")
    submit.add_argument("--wait", action="store_true", help="wait for the task to end")
    parsers["status"].add_argument("--wait", action="store_true", help="once the task has ended")
    parsers["log"].add_argument("--follow", action="store_true", help="until the task ends")
    return parsers


def parse_client_args(argv):
    """The client's command and options; argparse exits 2 on bad ones."""
    parser = client_parsers()[argv[0]]
    args = parser.parse_intermixed_args(argv[1:])  # KEY=VALUE may follow --follow
    args.command = argv[0]
    if getattr(args, "task_id", None) is not None and not re.fullmatch(ID_RE, args.task_id):
        parser.error(f"not a task id: {args.task_id!r} (13 hex digits)")
    try:
        args.client = Client(args.url, os.environ.get("TASKTRAIN_TOKEN"))
    except ValueError as e:
        parser.error(str(e))
    return args


def run_client(argv):
    """Run one client command; returns its exit status."""
    args = parse_client_args(argv)
    # Records hold what scripts wrote: on a terminal that is not UTF-8, a `?` each.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        return CLIENT_RUNS[args.command](args.client, args)
    except Refused as e:
        print(f"tasktrain.py {args.command}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except Unreachable as e:
        print(f"tasktrain.py {args.command}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE


def client_submit(client, args):
    """submit NAME [KEY=VALUE ...] [--follow] [--wait]"""
    body = urllib.parse.urlencode([("name", args.name)] + args.params).encode()
    status, _, record = client.call("POST", "/task", body, {"Content-Type": FORM_TYPE})
    if status not in (200, 201):
        raise Refused(record.strip())
    task_id = record_field(record, "ID")
    if args.follow or args.wait:  # the id first: should the daemon go, the task is known
        print(f"Task {task_id} queued." if status == 201 else
              f"Task {task_id} was already queued (an identical one).", file=sys.stderr)
    if args.follow:
        return follow_to_end(client, task_id)
    if args.wait:
        record = client.outcome(task_id)
    write_out(record)
    return outcome_exit(record) if args.wait else EXIT_COMPLETE


def follow_to_end(client, task_id):
    """Stream a task's output until it ends; its end decides the exit status.

    The wait for the end is sent before the stream: a daemon that is stopped stops
    listening first, then stops the task, answers the waits under way (the running
    task failed) and ends the streams. If that wait brings no outcome, the client
    asks again.
    """
    waiting = client.send_outcome_wait(task_id)
    try:
        client.copy(f"/tasks/{task_id}/log?follow=1", sys.stdout.buffer)
        record = client.answered_outcome(waiting)
    finally:
        waiting.close()
    status = record_status(record or client.outcome(task_id))
    print(f"Task {task_id} {status}.", file=sys.stderr)
    return EXIT_COMPLETE if status == "complete" else EXIT_FAILED


def client_status(client, args):
    """status ID [--wait]: 0 unless it failed or was cancelled."""
    if args.wait:
        record = client.outcome(args.task_id)
    else:
        status, _, record = client.call("GET", f"/tasks/{args.task_id}")
        if status != 200:
            raise Refused(record.strip())
    write_out(record)
    return EXIT_FAILED if record_status(record) in ("failed", "cancelled") else EXIT_COMPLETE


def client_log(client, args):
    """log ID [--follow]"""
    if args.follow:
        return follow_to_end(client, args.task_id)
    client.copy(f"/tasks/{args.task_id}/log", sys.stdout.buffer)
    return EXIT_COMPLETE


def client_cancel(client, args):
    """cancel ID: 0 once cancelled (202: stopped, its .on-finish still runs); 2 if it
    had already finished."""
    status, _, record = client.call("DELETE", f"/tasks/{args.task_id}",
                                    timeout_s=CANCEL_TIMEOUT_S)
    if status not in (200, 202):
        raise Refused(record.strip())
    write_out(record)
    return EXIT_COMPLETE


def client_list(client, args):
    """list: one line per task, newest first."""
    # format=json, not Accept: a refusal then comes as its one line, not as JSON.
    status, _, answer = client.call("GET", "/tasks?format=json")
    if status != 200:
        raise Refused(answer.strip())
    write_out("".join(
        f"{task['id']}  {task['status']:<9}  {task['created']}  {task['name']}  "
        + json.dumps(task["params"], ensure_ascii=False, separators=(",", ":")) + "\n"
        for task in json.loads(answer)))
    return EXIT_COMPLETE


CLIENT_RUNS = {"submit": client_submit, "status": client_status, "log": client_log,
               "cancel": client_cancel, "list": client_list}


def main(argv=None):
    """Run the daemon until SIGTERM or SIGINT, or a client command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # A client's --url may also come before its command (the daemon has no --url).
    url_options = 0
    if argv[:1] == ["--url"]:
        url_options = 2
    elif argv[:1] and argv[0].startswith("--url="):
        url_options = 1
    if argv[url_options:url_options + 1] and argv[url_options] in CLIENT_COMMANDS:
        command = argv[url_options]
        return run_client([command] + argv[:url_options] + argv[url_options + 1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s tasktrain: %(message)s")
    scripts_dir = os.path.abspath(args.scripts_dir or os.path.join(HERE, "scripts.d"))
    # Records and logs show the scripts folder as the user named it.
    shown_scripts_dir = (printable(args.scripts_dir.rstrip("/") or "/") if args.scripts_dir
                         else "scripts.d")
    state_dir = os.path.abspath(args.state_dir or os.path.join(HERE, "state"))
    try:
        os.makedirs(scripts_dir, exist_ok=True)
        os.makedirs(state_dir, exist_ok=True)
        store = TaskStore(state_dir, args.keep)
    except StateDirBusy:
        log.error("another Task Train is using %s; stop it first, or give this one "
                  "its own --state-dir", state_dir)
        return 1
    except OSError as e:  # a folder the daemon's user may not write, or a file in its place
        reason = "it is not a folder" if isinstance(e, FileExistsError) else e.strerror
        log.error("cannot use %s: %s", e.filename or state_dir, reason)
        return 1
    except sqlite3.Error as e:
        log.error("cannot open the task database in %s: %s", state_dir, e)
        return 1
    runner = Runner(store, scripts_dir, shown_scripts_dir, args.timeout, args.grace)
    try:
        server = TaskTrainServer((args.host, args.port), store, runner, args.token, args.secret,
                                 args.allow_host)
    except OSError as e:
        log.error("cannot listen on %s port %d: %s", args.host, args.port, e.strerror)
        return 1
    stop_reader, stop_writer = catch_stop_signals()
    pending = store.pending_count()  # before the runner claims the first of them
    runner.start()

    host, port = server.server_address[:2]
    log.info("version %s; scripts go in %s/NAME/ (one folder per task name); state in %s",
             __version__, scripts_dir, state_dir)
    log.info("%d task(s) pending", pending)
    if args.secret and not args.token:
        log.warning("--secret without --token: submissions must be signed, but reads and "
                    "cancels (GET /tasks..., DELETE /tasks/ID) are open to whoever reaches "
                    "port %d; set --token to guard them too", port)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"Server running at http://{shown_host}:{port}", flush=True)

    signame = signal.Signals(server.serve_until_signalled(stop_reader)).name
    log.info("%s: stopping; pending tasks stay queued for the next start", signame)
    server.server_close()
    runner.shutdown(f"Task Train was stopped ({signame}) while this task ran; "
                    "its scripts were stopped.")
    server.end_answers(ANSWERS_END_S)
    store.close()
    stop_reader.close()
    stop_writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
