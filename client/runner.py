"""confide's ClientApp runner: the one process that runs an institution's Flower tasks.

The trust decision. A run reaches an institution's SuperNode with its app, a FAB. Flower's
default (`--isolation subprocess`) starts `flower-superexec`, which launches `flwr-clientapp`
per message; that installs the FAB (`install_from_fab`) and imports whatever ClientApp its
pyproject names. Whoever could start a run could so run any code at every institution. An
institution runs only confide's own ClientApp, installed on its host with confide, so its
SuperNode runs with `--isolation process` and this runner takes its tasks instead of SuperExec:

- it takes every task, of every type Flower defines (`TASK_TYPES`), from the SuperNode's
  Runtime API on 127.0.0.1, signing its requests with a SuperExec secret (a random file in the
  institution's folder, mode 0600, new at every `confide-client start`): no other local
  process can take the institution's tasks, every task token comes to this process only, and
  no task is left waiting (a SuperNode makes an AgentApp task, not a ClientApp one, for each
  message of a run whose primary task type is AgentApp: asked only for ClientApp tasks, those
  would pile up unanswered);
- for each task it pulls the task's input from the SuperNode as data: the message, the run's
  context and the FAB's bytes. Nothing of it is installed or imported; before the message is
  handed to any app, it decides, in this order:
  1. the context's node config names this runner's own folder (`--dir`, compared resolved).
     The SuperExec secret proves the runner to the SuperNode, not the SuperNode to the
     runner: a local process that occupied 127.0.0.1:port first could hand it tasks naming
     any folder, to train on files it can read or spend another ledger. Such a task gets an
     error reply (FOREIGN_TASK) and is logged; nothing is recorded in a ledger;
  2. the task is a ClientApp's: any other (an AgentApp) is refused;
  3. the run's FAB (`confide.client.app_check`): its bytes hash to the run's declared hash,
     it holds nothing but a pyproject.toml (and Flower's manifest of it), and that pyproject
     names `confide.client.app:app`. The FAB is read with zipfile and tomllib only;
- a refused app (2 or 3) gets an error reply (code APP_REFUSED) that says why without naming
  anything on this host, the refusal is recorded in the institution's ledger and logged here;
- an accepted app runs in this process: `confide.client.app` is imported once at start
  (torch included), so a message costs its work, not a Python start and an import.
- a message is served once (`confide.client.served`): its id is recorded before the app
  sees it, and a copy that comes back (Flower delivers at least once) gets an error reply
  (ALREADY_SERVED) instead of a second round of training and a second ledger entry.

The folder check does not stop a process that occupies the port and names this folder: its
tasks then run confide's own ClientApp under the institution's own limits and ledger.
`confide-client start` refuses to start while the port is taken; the port is free only while
no SuperNode runs (a refused activation is retried after a pause).

Flower's own `--trusted-entities` cannot serve here: it accepts an app only if the FAB
carries a signature by a listed key in its verifications, which Flower's platform adds when
an app is published and reviewed there. A FAB that `flwr run` builds from a folder (every
confide job) carries none, so every job would be refused.

Tasks run one at a time: the ledger has one writer. The runner stops on SIGTERM or SIGINT,
and when `confide-client start`, its parent (`--parent-pid`), is gone, however it ended
(`confide.client.flower_supernode.follow_parent`). It does not watch the SuperNode: `start`
does, and stops the runner when the SuperNode ends for good; while a refused activation is
retried, the runner waits for the next SuperNode.

    python -m confide.client.runner --dir INSTITUTION_DIR [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    SendTaskHeartbeatRequest,
)
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from confide.client.app_check import CLIENTAPP, AppRefused, check_app
from confide.client.flower_supernode import follow_parent
from confide.client.institution import STATE_DIR_KEY, InstitutionDir, InstitutionError
from confide.client.served import ServedMessages
from confide.common.errors import RunnerError
from confide.common.files import write_atomic
from confide.privacy.ledger import Ledger, LedgerError
from confide.privacy.policy import ALREADY_SERVED, APP_REFUSED, REFUSED_BY_POLICY

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

# Named, not __name__: run as `python -m`, this module is __main__, outside "confide".
_log = logging.getLogger("confide.client.runner")
# The SuperExec secret, in the institution's folder (raw bytes, as Flower reads it).
SECRET_FILE = "superexec.secret"
RUNTIME_HOST = "127.0.0.1"
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
POLL_SECONDS = 0.2  # between AcquireTask calls while idle: one local HTTP request (the
# SuperNode itself asks the SuperLink every 0.5 s: `flower_supernode.prompt_pulls`)
UNREACHABLE_PAUSE_SECONDS = 0.5  # while the SuperNode's Runtime API is not up (yet)
TASK_RETRY_SECONDS = 60.0  # a task's calls retry a SuperNode that does not answer this long
_RETRYABLE_STATUS = {502, 503, 504}
# Every task type Flower defines. The SuperNode matches a pending task on its type
# (`supported_task_types`) or on its FAB's hash (`agentapp_fab_hashes`, for an executor that
# keeps one AgentApp warm): asking for every type takes every task, whatever its FAB.
TASK_TYPES = tuple(task_type.value for task_type in TaskType)
# The error code of a reply to a task that names another folder: the reply goes back to
# whoever handed the task (never this institution's SuperNode), so no confide code is needed.
FOREIGN_TASK = ErrorCode.UNKNOWN
_LOGGED_CHARS = 300  # of a folder name a foreign task chose, in this host's log


class _Stopped(BaseException):
    """SIGTERM, SIGINT, or the parent gone (a SIGINT): stop now, even inside a task."""


def write_secret(root: Path) -> Path:
    """A new random SuperExec secret in `root` (mode 0600 from its first byte); its path."""
    path = Path(root) / SECRET_FILE
    write_atomic(path, os.urandom(32), mode=0o600)
    return path


@dataclass(frozen=True)
class Outcome:
    """What one task ends with: the reply, and the status and details Flower records."""

    reply: Message
    status: str
    details: str


@dataclass
class Runner:
    """Runs this institution's tasks: refuses any app but confide's, runs confide's warm.

    `folder` is the institution's folder (`--dir`), which holds its settings and ledger."""

    institution: str
    folder: Path
    app: ClientApp
    address: str
    refused: set[int] = field(default_factory=set)
    refused_rounds: set[int] = field(default_factory=set)  # runs with a round refused
    served: ServedMessages = field(init=False)

    def __post_init__(self) -> None:
        self.served = ServedMessages(self.folder)

    def decide(
        self, task_type: str, message: Message, *, context: Context, run: Run, fab: Fab
    ) -> Outcome:
        """The outcome of one pulled task (module docstring): a refusal, or what confide's
        ClientApp replies. The folder comes first: a task from elsewhere records nothing."""
        if not self.is_own_folder(context):
            return self.refuse_foreign(message, context, run)
        if task_type != TaskType.CLIENT_APP:
            return self.refuse(message, run=run, fab=fab, why=_not_a_clientapp(task_type))
        try:
            check_app(fab, run.fab_hash)
        except AppRefused as refusal:
            return self.refuse(message, run=run, fab=fab, why=str(refusal))
        if not self.served.claim(message.metadata.message_id or message.object_id):
            return self.refuse_copy(message, run)
        return self.run_app(message, context)

    def is_own_folder(self, context: Context) -> bool:
        """Whether the task's node config names this runner's folder (the ClientApp reads
        the folder, hence the data, the limits and the ledger, from there)."""
        named = context.node_config.get(STATE_DIR_KEY)
        if not isinstance(named, str) or not named:
            return False
        try:
            return Path(named).resolve() == self.folder.resolve()
        except (OSError, RuntimeError, ValueError):  # unreadable, a symlink loop, a NUL byte
            return False

    def refuse_foreign(self, message: Message, context: Context, run: Run) -> Outcome:
        """A FOREIGN_TASK reply to a task that names another folder; logged, nothing
        recorded: whoever handed it is not this institution's SuperNode."""
        named = str(context.node_config.get(STATE_DIR_KEY, ""))[:_LOGGED_CHARS]
        _log.error(
            "refused a task of run %s: it names folder %r, not this institution's %s; the "
            "process answering on %s is not the SuperNode `confide-client start` started",
            run.run_id,
            named,
            self.folder,
            self.address,
        )
        reason = (
            f"{self.institution}'s runner refuses the task: the SuperNode that handed it was "
            "not started for this institution"
        )
        reply = Message(error=Error(code=FOREIGN_TASK, reason=reason), reply_to=message)
        return Outcome(reply, SubStatus.FAILED, reason)

    def refuse(self, message: Message, *, run: Run, fab: Fab, why: str) -> Outcome:
        """An APP_REFUSED reply; the refusal is logged and recorded in the ledger (once per
        run in this process: a refused run sends every round's messages)."""
        reason = f"{self.institution} refuses run {run.run_id}: {why}"
        _log.warning("refused run %s (FAB sha256 %s): %s", run.run_id, fab.hash_str, why)
        if run.run_id not in self.refused:
            try:
                Ledger(self.folder).record_refusal(
                    run=str(run.run_id), fab_hash=fab.hash_str, reason=reason
                )
                self.refused.add(run.run_id)
            except LedgerError as problem:
                _log.error("the refusal of run %s is not in the ledger: %s", run.run_id, problem)
        reply = Message(error=Error(code=APP_REFUSED, reason=reason), reply_to=message)
        return Outcome(reply, SubStatus.FAILED, reason)

    def refuse_copy(self, message: Message, run: Run) -> Outcome:
        """An ALREADY_SERVED reply to a message this runner served before (a copy Flower
        delivered again): nothing runs, nothing is recorded."""
        kind = message.metadata.message_type
        reason = (
            f"{self.institution} already answered this {kind} message of run {run.run_id}; "
            "a copy delivered again is not run twice"
        )
        _log.warning("run %s: a %s message came again; not run twice", run.run_id, kind)
        reply = Message(error=Error(code=ALREADY_SERVED, reason=reason), reply_to=message)
        return Outcome(reply, SubStatus.FAILED, reason)

    def run_app(self, message: Message, context: Context) -> Outcome:
        """confide's ClientApp on the message, in this process. A failure's reply names what
        failed, not how: its detail (paths, values) stays in this host's log."""
        try:
            reply = self.app(message=message, context=context)
        except Exception as error:
            kind = message.metadata.message_type
            _log.exception("run %s: the ClientApp failed on a %s message", context.run_id, kind)
            reason = (
                f"{self.institution}'s ClientApp failed on a {kind} message "
                f"({type(error).__name__}); the detail is in the institution's log"
            )
            failed = Message(
                error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=message,
            )
            return Outcome(failed, SubStatus.FAILED, reason)
        refused = reply.has_error() and reply.error.code == REFUSED_BY_POLICY
        if refused and context.run_id not in self.refused_rounds:
            self.refused_rounds.add(context.run_id)
            self.record_round_refusal(message, context, reply.error.reason or "")
        return Outcome(reply, SubStatus.COMPLETED, "")

    def record_round_refusal(self, message: Message, context: Context, reason: str) -> None:
        """A round the institution's limits refused, in its ledger ('refused-round', under
        the Flower run that asked), so that the institution counts its own refusals (its
        /metrics), not only the coordinator. Once per run in this process: the refusal is
        final for the job (its spend only grows, its sigma is fixed), and a coordinator that
        asked again and again must not grow the ledger (every append verifies the chain). A
        ledger that cannot take it is logged: the refusal has been answered either way."""
        config = message.content.config_records.get("config")
        named = config.get("server-round", 0) if config is not None else 0
        server_round = named if isinstance(named, int) else 0
        try:
            Ledger(self.folder).record_round_refusal(
                run=str(context.run_id), server_round=server_round, reason=reason
            )
        except LedgerError as problem:
            _log.error("the refusal of a round of run %s is not in the ledger: %s",
                       context.run_id, problem)  # fmt: skip

    def serve_task(self, task: Task, token: str) -> None:
        """Pull the task's input, decide, push the reply and the context; the task is
        finished as failed if any of that fails (or the runner is stopped meanwhile). Every
        task type comes here: only `decide` tells them apart."""
        retry = _retry()
        client = task_client(self.address, token, retry)
        heartbeat = HeartbeatSender(_task_heartbeat(client, task.task_id))
        context: Context | None = None
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client)  # data only
            outcome = self.decide(task.type, message, context=context, run=run, fab=fab)
            push_message(client, outcome.reply, context)
            push_task_output(client, context, outcome.status, outcome.details)
        except Exception:  # a task that carries no message (no type a SuperNode makes) too
            _log.exception("task %s (%s) could not be completed", task.task_id, task.type)
            push_task_output(client, context, SubStatus.FAILED, "the runner could not complete it")
        except BaseException:
            retry.max_tries = 1  # stopping: one try, as Flower's own process on exit
            push_task_output(client, context, SubStatus.FAILED, "the runner stopped")
            raise
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()


def _not_a_clientapp(task_type: str) -> str:
    """Why a task of another type than ClientApp is refused (`task_type` is Flower's)."""
    kind = "an AgentApp" if task_type == TaskType.AGENT_APP else f"a {task_type[:40]!r} task"
    return f"its app runs here as {kind}, not a ClientApp; this institution runs only {CLIENTAPP}"


def _retry() -> RetryInvoker:
    """Flower's retry, bounded, and without its per-process reflexes: Flower's own invoker
    signals its process on a 401, which would stop this long-lived runner for one task."""

    def give_up(error: Exception) -> bool:
        status = error.response.status_code if isinstance(error, httpx.HTTPStatusError) else 0
        return bool(status) and status not in _RETRYABLE_STATUS

    return RetryInvoker(
        lambda: exponential(max_delay=10),
        (httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=TASK_RETRY_SECONDS,
        should_giveup=give_up,
    )


def task_client(address: str, token: str, retry: RetryInvoker) -> RuntimeHttpClient:
    """A Runtime API client for one task, authenticated with its token."""
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # 127.0.0.1 only; the token and the secret authenticate
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry,
    )


def acquire_client(address: str, secret: bytes) -> RuntimeHttpClient:
    """The client that takes tasks, signing AcquireTask with the SuperExec secret."""
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD}),
        ],
    )


def _task_heartbeat(client: RuntimeHttpClient, task_id: int) -> Callable[[], bool]:
    """Flower's task heartbeat, but a task the SuperNode dropped is logged, not a SIGINT to
    the whole process (the task's reply is then refused by the SuperNode)."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.HTTPError:
            return False  # HeartbeatSender retries with backoff
        if not response.success:
            _log.warning("the SuperNode no longer holds task %s", task_id)
        return True

    return beat


def serve(runner: Runner, acquire: RuntimeHttpClient, *, poll: float = POLL_SECONDS) -> NoReturn:
    """Take tasks one at a time, forever (until `_Stopped` or a RunnerError)."""
    request = acquire_request()
    reachable: bool | None = None
    while True:
        try:
            response = acquire.AcquireTask(request)
        except httpx.TransportError:
            if reachable is not False:
                _log.info("waiting for the SuperNode's Runtime API at %s", runner.address)
            reachable = False
            time.sleep(UNREACHABLE_PAUSE_SECONDS)
            continue
        except httpx.HTTPStatusError as error:
            _refused_by_supernode(error, runner.address)
            time.sleep(UNREACHABLE_PAUSE_SECONDS)
            continue
        if not reachable:
            _log.info("taking %s's tasks from %s", runner.institution, runner.address)
            reachable = True
        if response.HasField("task") and response.token:
            runner.serve_task(response.task, response.token)
        else:
            time.sleep(poll)


def acquire_request() -> AcquireTaskRequest:
    """What the runner asks the SuperNode for: a task of any type (`TASK_TYPES`)."""
    return AcquireTaskRequest(supported_task_types=TASK_TYPES)


def _refused_by_supernode(error: httpx.HTTPStatusError, address: str) -> None:
    """A 401 is fatal (the SuperNode holds another secret); anything else is logged."""
    if error.response.status_code == httpx.codes.UNAUTHORIZED:
        raise RunnerError(
            f"the SuperNode on {address} refused this runner's SuperExec secret: it was started "
            "with another one. Another SuperNode of this institution may still be running "
            "(stop it), or another program holds that port; start both with `confide-client "
            "start`"
        )
    _log.warning("the SuperNode answered %s to AcquireTask", error.response.status_code)


def _stop(signum: int, _frame: object) -> NoReturn:
    raise _Stopped(signal.Signals(signum).name)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m confide.client.runner",
        description="Run this institution's Flower tasks: only confide's own ClientApp.",
    )
    parser.add_argument("--dir", type=Path, required=True, help="the institution's folder")
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="stop once this process is no longer the runner's parent (`confide-client start`)",
    )
    return parser.parse_args(argv)


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s runner: %(message)s"))
    package = logging.getLogger("confide")
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def _load(root: Path) -> tuple[str, str, bytes]:
    """(institution, Runtime API address, secret) from the institution's folder."""
    try:
        config = InstitutionDir(root).load()
        secret = (root / SECRET_FILE).read_bytes()
    except (InstitutionError, OSError) as error:
        raise RunnerError(str(error)) from error
    if not secret:
        raise RunnerError(f"{root / SECRET_FILE} is empty")
    return config.name, f"{RUNTIME_HOST}:{config.port}", secret


def main(argv: Sequence[str] | None = None) -> int:
    """Run until stopped: 0 when stopped, 1 if the runner cannot work."""
    args = _arguments(argv)
    _configure_logging()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    if args.parent_pid is not None:
        follow_parent(args.parent_pid)  # SIGINT to this process once `start` is gone
    try:
        institution, address, secret = _load(args.dir)
        from confide.client.app import app  # once: every message then runs warm

        runner = Runner(institution, args.dir.resolve(), app, address)
        acquire = acquire_client(address, secret)
        try:
            serve(runner, acquire)
        finally:
            acquire.close()
    except _Stopped as stopped:
        _log.info("runner stopped (%s)", stopped)
        return 0
    except RunnerError as error:
        _log.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
