"""Every default and limit in one place, each with the reason for its value."""

PROTOCOL_VERSION = 1

# Ports: adjacent, unprivileged, unassigned by IANA.
CLIENT_PORT = 7411
WORKER_PORT = 7412
BROKER_HOST = "127.0.0.1"  # loopback until keys exist (SPEC §6)

# Heartbeats: 1 s is cheap even for thousands of workers; 5 misses ride out a GC pause or a
# congested link without declaring a live worker lost.
HEARTBEAT_INTERVAL = 1.0
LIVENESS = 5

# A lost worker's job goes back to the queue this often without spending a retry (SPEC §5).
MAX_LOST_REQUEUES = 3

# Job defaults (SPEC §2).
CPUS = 1.0
MEMORY_MIB = 0
GPUS = 0
PRIORITY = 0
MAX_ATTEMPTS = 1
CANCEL_GRACE = 10.0

# Limits against hostile or mistaken input.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # ZMQ_MAXMSGSIZE: a 200k-job array fits easily
MAX_JOBS_PER_SUBMIT = 200_000
MAX_GROUPS_PER_SUBMIT = 10_000
MAX_COMMAND_BYTES = 64 * 1024
MAX_NAME = 256
MAX_PATH = 4096
MAX_ENV_ENTRIES = 1000
MAX_TAGS = 64
MAX_DEPS_PER_JOB = 1000
MAX_CLAIM = 1024
OUTPUT_TAIL_BYTES = 4096  # the tail of stdout/stderr sent with a result
PROGRESS_MESSAGE_MAX = 1024
STATUS_LIMIT = 1000  # rows per status reply unless the client asks for fewer/more
EVENTS_LIMIT = 10_000
# How far down the eligible index one claim looks for a job that fits before giving up for now.
CLAIM_SCAN_LIMIT = 4096

# LMDB: start small and double on MapFullError, so a test store costs nothing and a big one grows.
INITIAL_MAP_SIZE = 64 * 1024 * 1024
MAX_MAP_SIZE = 1 << 40

# Worker: progress at most 4 times a second is live enough for a human and cheap for the broker.
PROGRESS_INTERVAL = 0.25
# A job's `started` report waits this long: one that ends sooner is reported once, by its
# result (which carries the runtime), saving the broker a durable commit per short job.
STARTED_REPORT_DELAY = 0.02
# Unacknowledged results are sent again this often.
RESULT_RESEND = 2.0
# Reconnect backoff after the broker goes quiet.
RECONNECT_MIN = 0.2
RECONNECT_MAX = 5.0
# A connection problem that persists (a refused key) is logged again this often, not per retry.
TROUBLE_LOG_INTERVAL = 60.0
# A stopping worker's last message (`stopping`) may take this long to leave before it exits.
STOP_LINGER = 1.0

# Client: how long a request may wait for the broker before BrokerUnavailable.
CLIENT_TIMEOUT = 10.0

# Worker runner (banyan/worker/runner.py).
# A pass over /proc costs milliseconds: hunt a finished job's escaped processes at most this often.
ORPHAN_SWEEP_INTERVAL = 1.0
# Ended attempts whose output files the worker still serves to `banyan-logs` (~0.5 KiB each).
FINISHED_LOGS_KEPT = 10_000
LOG_CHUNK_MAX = 1024 * 1024  # protocol: log_chunk data ≤ 1 MiB
# nvidia-smi can hang on a wedged driver; the worker must still start.
GPU_PROBE_TIMEOUT = 5.0
