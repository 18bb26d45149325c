"""Every error confide raises on purpose, in one tree (as httpx keeps its in `_exceptions.py`).

Catch `ConfideError` to catch them all: the command-line tools do, once, and print the message
with exit code 2 (`confide.common.terminal`). Every message is written for the person who must
act on it: it says what is wrong, where (file, field, institution) and, where there is one, what
to do. Each class also keeps the standard base it always had (`ValueError`, `RuntimeError`,
`TimeoutError`), so code written against those still catches it.

    ConfideError
    ├── InputError                  input that cannot be used (ValueError)
    │   ├── ConfigFileError         a configuration file: unreadable, not TOML, or invalid
    │   ├── ScenarioError           a scenario file that cannot be run
    │   ├── JobError                a job that cannot be submitted or found
    │   ├── StateError              a coordinator state directory
    │   ├── InstitutionError        an institution's folder
    │   ├── DatasetError            a data file or dataset
    │   ├── TaskError               a task that cannot be found or used (an installed one)
    │   ├── PartitionError          data that cannot be split as asked
    │   ├── PKIError                a certificate or key
    │   ├── TokenError              a join token
    │   ├── DeltaTooLarge           a job's delta not below 1/N for an institution's N
    │   ├── PrivacyError            DP-SGD that cannot run as configured
    │   ├── ModelFileError          a saved model (weights and card) that cannot be used
    │   └── RegistryError           a model version the coordinator's registry does not hold
    ├── Refusal                     a request refused by a rule, on purpose (ValueError)
    │   ├── PolicyRefusal           a round that would break an institution's limits
    │   ├── AppRefused              a run's app that is not confide's own
    │   ├── UpdateRejected          an update the coordinator does not aggregate
    │   ├── UnknownInstitution      an institution not enrolled, or revoked
    │   ├── RotationRefused         a key rotation the coordinator refuses (RuntimeError)
    │   └── ContinuityError         a ledger that must not start or continue as asked
    ├── RecordError                 a tamper-evident record that cannot be used (RuntimeError)
    │   ├── LedgerError             an institution's privacy ledger
    │   │   └── LedgerTampered      ... whose chain does not verify
    │   ├── LedgerIndexError        the index of an institution's ledgers
    │   ├── CheckpointError         a coordinator's checkpoint of a job (missing, foreign, tampered)
    │   └── AuditError              the coordinator's audit log
    │       └── AuditUnavailable    ... because a file or the database refused
    ├── ServiceError                a process or service that failed (RuntimeError)
    │   ├── CoordinatorError        the coordinator could not start or stop
    │   ├── FrontError              the Fleet API front could not start
    │   ├── FlowerError             a `flwr` command failed
    │   ├── RunnerError             an institution's runner cannot work
    │   ├── RegistrationError       the SuperLink did not register a key
    │   ├── RotationUnfinished      a key rotation left half done
    │   └── JoinError               joining a federation failed
    │       └── RotationError       ... rotating the institution's key
    └── JobRunError                 a job or run that ended early (RuntimeError)
        ├── JobStopped              too few institutions can still train
        ├── TooFewInstitutions      not enough connected in time (also a TimeoutError)
        ├── JobFailed               a deployed job that could not run
        ├── SimulationError         a simulation that cannot start or did not finish
        ├── RunError                a simulated run that cannot start or did not finish
        └── DeploymentBenchError    the local deployment of a benchmark failed

Exceptions used only for control flow inside one module (a runner told to stop, an oversized
request body) stay private there: they never reach a user.
"""

from __future__ import annotations

from pathlib import Path


class ConfideError(Exception):
    """The root: anything confide refuses or fails at on purpose, with a message for the user."""


# -- input -------------------------------------------------------------------------------------
class InputError(ConfideError, ValueError):
    """Input that cannot be used; the message names the file, field or value."""


class ConfigFileError(InputError):
    """A configuration file that cannot be read or is invalid; names the file and fields."""


class ScenarioError(InputError):
    """A scenario file that cannot be run; the message names the file and every bad field."""


class JobError(InputError):
    """A job that cannot be submitted or found; the message says what and where."""


class StateError(InputError):
    """A state directory that cannot be used; the message says what and where."""


class InstitutionError(InputError):
    """An institution directory that cannot be used; the message says what and where."""


class DatasetError(InputError):
    """A data file or dataset that cannot be used, with what and where in the message."""


class TaskError(InputError):
    """A task that cannot be found or used: an unknown name, or an installed task package
    (entry-point group `confide.tasks`) that is refused; the message names the entry point,
    its distribution and what to do."""


class PartitionError(InputError):
    """The data cannot be split as asked (too few examples, too many institutions...)."""


class PKIError(InputError):
    """A certificate or key that cannot be used; the message names the file."""


class TokenError(InputError):
    """A token that is malformed, unknown, expired or already used."""


class DeltaTooLarge(InputError):
    """The job's delta is not below 1/N for the institution's declared size N."""


class PrivacyError(InputError):
    """DP-SGD cannot run as configured (e.g. a model layer Opacus cannot make private)."""


class ModelFileError(InputError):
    """A saved model that cannot be used: no card, a hash that does not match, weights that
    do not fit the architecture its card describes."""


class RegistryError(InputError):
    """A model version that is not in the coordinator's registry, or a malformed reference."""


# -- refusals ----------------------------------------------------------------------------------
class Refusal(ConfideError, ValueError):
    """A request refused by a rule, on purpose; the message says which rule and why."""


class PolicyRefusal(Refusal):
    """This round would break the institution's limits; the message says which and by how much."""


class AppRefused(Refusal):
    """The run's app is not confide's own; the message says why, in one clause."""


class UpdateRejected(Refusal):
    """An institution's update the coordinator does not aggregate; the message says why."""


class UnknownInstitution(Refusal):
    """An unknown or already revoked institution."""


class RotationRefused(Refusal, RuntimeError):
    """The rotation did not start, or was undone: the institution's current key stays in
    use. The message says why and what to do."""


class ContinuityError(Refusal, RuntimeError):
    """`join` must not start this folder's budget as asked; the message says why and how."""


# -- tamper-evident records --------------------------------------------------------------------
class RecordError(ConfideError, RuntimeError):
    """A tamper-evident record (ledger, audit log) that cannot be used as it stands."""


class LedgerError(RecordError):
    """The ledger cannot be used; the message says what and where."""


class LedgerTampered(LedgerError):
    """The ledger failed verification: training must wait for an operator."""

    def __init__(self, ledger: Path, problems: list[str]) -> None:
        self.problems = problems
        listed = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        super().__init__(
            f"{ledger} failed verification ({listed}). No training until an operator "
            f"checks it: `confide-client budget verify --dir {ledger.parent}`"
        )


class LedgerIndexError(RecordError):
    """The index file cannot be read or written; the message names it."""


class CheckpointError(RecordError):
    """A job's checkpoint that cannot be used to resume it: none, for another job or run,
    encrypted with another key, truncated or altered; the message says which and where."""


class AuditError(RecordError):
    """The audit log cannot be written as it stands; the message says what and where."""


class AuditUnavailable(AuditError):
    """A file or the database refused (the cause is chained): the log may be intact, and a
    reseal is no remedy; fix the permissions, the disk or the database."""


# -- services ----------------------------------------------------------------------------------
class ServiceError(ConfideError, RuntimeError):
    """A process or service that failed; the message says why and where to look."""


class CoordinatorError(ServiceError):
    """The coordinator could not start or stop; the message says why and where to look."""


class FrontError(ServiceError):
    """The Fleet API front could not start; the message says why."""


class FlowerError(ServiceError):
    """A `flwr` command failed; the message is Flower's own, last line first."""


class RunnerError(ServiceError):
    """The runner cannot work at all (settings, secret, the SuperNode refusing it)."""


class RegistrationError(ServiceError):
    """The SuperLink did not register the key; the message says why."""


class RotationUnfinished(ServiceError):
    """A rotation started and did not finish; the message says what stands. A request for the
    same new key, signed with either key, finishes it."""


class JoinError(ServiceError):
    """Joining failed; nothing was registered unless the message says so."""


class RotationError(JoinError):
    """Rotating the key failed; the current key stays in use unless the message says so.

    `refused`: the coordinator answered with a refusal (it did not take the new key), as
    opposed to no answer, after which it may have.
    """

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


# -- jobs and runs -----------------------------------------------------------------------------
class JobRunError(ConfideError, RuntimeError):
    """A job or run that could not start or ended early; the message says why."""


class JobStopped(JobRunError):
    """Fewer institutions than `min_train` can still train (their limits or their app check
    refuse more rounds); the job ends after the last completed round."""


class TooFewInstitutions(JobRunError, TimeoutError):
    """Not enough institutions were connected within the job's timeout."""


class JobFailed(JobRunError):
    """The job could not run (too few institutions, bad run config); the message says why.

    Flower logs a ServerApp's exception with its traceback, which here would bury the one
    thing the operator needs: this class reads its `__traceback__` as None, so Flower's log
    shows the message alone (the run still ends as failed).
    """

    @property
    def __traceback__(self) -> None:
        return None

    @__traceback__.setter
    def __traceback__(self, _: object) -> None:
        pass


class SimulationError(JobRunError):
    """A simulation that cannot start or did not finish; the message is for the user."""


class RunError(JobRunError):
    """A run that cannot start or did not finish; the message is for the user."""


class DeploymentBenchError(JobRunError):
    """The local deployment did not come up or the job did not finish."""
