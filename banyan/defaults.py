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

# Ended jobs, their attempts and events are kept this long, then purged: a month of history
# for status and stats, after which the store stops growing with the work that passes through.
RETENTION = 30 * 86400.0
# A purge runs in transactions of its own of 5 ms, so the loop stays responsive; while it is
# behind, up to a quarter of the loop's time (at most 20 ms a slice), so that it keeps up with
# a broker busy ending thousands of jobs a second (each costs the purge about 50 µs).
PURGE_SLICE = 0.005
PURGE_SHARE = 0.25
PURGE_SLICE_MAX = 0.02
# Caught up, the next purge waits at least this long: one transaction a second is plenty.
PURGE_REST = 1.0

# Fair share: usage counts half as much after a week, as Slurm's PriorityDecayHalfLife: long
# enough that a burst is remembered for days, short enough that last month is forgotten.
USAGE_HALF_LIFE = 7 * 86400.0

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
# The job text (command, name, cwd, output, env, tags, groups) of one submission, counted after
# an --array or --each is expanded: no more than one frame could carry sent job by job, so an
# array's template cannot make more than a request could (a 64 KiB command times 200,000
# indices was 12 GiB). A 200,000-job array fits at about 330 bytes of text per job.
MAX_SUBMIT_BYTES = MAX_MESSAGE_BYTES
# Maps and lists one request may unpack into; checked while unpacking frames over a MiB. An
# empty map is one byte on the wire and 64 in memory, so 64 MiB of them were 4 GiB before any
# schema saw them. Twenty per job of the biggest submission leaves room for any real one.
MAX_REQUEST_CONTAINERS = 20 * MAX_JOBS_PER_SUBMIT
MAX_GROUPS_PER_SUBMIT = 10_000
# A submission of more jobs is made a slice at a time, as a long operation: made at once it
# would hold the broker's loop past a few tens of milliseconds (about 10 µs a job on 2 cores).
BIG_SUBMISSION = 2_000
# The map is grown before a turn that could find less room than this (no turn is run twice
# because the map grew under it): more than a turn writes, even with a request at the frame
# limit in it. Address space, not disk.
MAP_HEADROOM = 4 * MAX_MESSAGE_BYTES
MAX_COMMAND_BYTES = 64 * 1024
MAX_NAME = 256
MAX_PATH = 4096
MAX_ENV_ENTRIES = 1000
# A submitter's exported environment (`--export`, default ALL) travels once per request and is
# stored once per distinct content. Linux passes at most 128 KiB per variable and about 2 MiB
# of arguments and environment together; a quarter of that is far more than any real shell has.
MAX_ENVIRONMENT_BYTES = 512 * 1024
# Accounts one worker may say it cannot run (missing there, or root): a worker refusing more
# is misconfigured, and the broker keeps its record small.
MAX_REFUSED_ACCOUNTS = 1024
MAX_TAGS = 64
MAX_DEPS_PER_JOB = 1000
MAX_CLAIM = 1024
# Claim-ahead (SPEC §5): jobs a worker may hold beyond its free room, so that a slot that frees
# starts its next job without a round trip to the broker. At most PREFETCH per worker by
# default; within that, each worker asks for as many as its slots run in AHEAD_HORIZON at the
# length of its recent jobs (claim's `ahead`): a stream of short jobs gets its slots fed, while
# jobs longer than the horizon are held nowhere, so priorities and fair share decide at every
# slot as without claim-ahead.
PREFETCH = 8
MAX_PREFETCH = 1024
AHEAD_HORIZON = 0.1  # seconds
OUTPUT_TAIL_BYTES = 4096  # the tail of stdout/stderr sent with a result
PROGRESS_MESSAGE_MAX = 1024
# Id ranges in one selector (`banyan-cancel 1-9 20-29 ...`): each is one index walk.
MAX_SELECT_RANGES = 1000
STATUS_LIMIT = 1000  # rows per status reply unless the client asks for fewer
# A status reply holds at most this many jobs (about 30 ms of the broker's loop); clients page
# with its `next` cursor for more.
STATUS_PAGE = 1000
# Jobs a status page reads and passes over (a name glob, or a filter its index cannot apply)
# before it ends early with a cursor, and index keys it counts matches by: with STATUS_PAGE,
# what keeps one status request near a tenth of a second however big the history.
STATUS_SCAN = 20_000
STATUS_COUNT_KEYS = 100_000
EVENTS_LIMIT = 10_000
# An `events` read may wait this long for the log to grow: long enough that a follower asks a
# few times a minute when nothing happens, short enough that a broker that died is noticed soon.
EVENTS_WAIT_MAX = 60.0

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
# Worker spool (banyan/worker/spool.py): a job's output is deleted a week after it last
# changed, a week being enough to read or copy it; sooner when free space is under 1 GiB,
# enough headroom for the output of the jobs running meanwhile on most machines.
SPOOL_RETENTION = 7 * 86400.0
SPOOL_MIN_FREE = 1 << 30
SPOOL_SWEEP = 600.0  # a pass over the spool for old output: at most every 10 minutes
SPOOL_DISK_CHECK = 5.0  # statvfs of the spool: cheap, so often enough to catch a filling disk
SPOOL_SLICE = 0.005  # seconds of spool upkeep per turn of the worker's loop
LOG_CHUNK_MAX = 1024 * 1024  # protocol: log_chunk data ≤ 1 MiB
# nvidia-smi can hang on a wedged driver; the worker must still start.
GPU_PROBE_TIMEOUT = 5.0
# A job's umask unless it asks for another: files its owner alone may change, anyone may read.
UMASK = 0o022
# How long a worker trusts what it looked up about a Unix account (passwd, groups, limits):
# each lookup reads /etc files, and accounts change rarely. A refused account is looked up again
# this often, and the worker registers again once it exists.
ACCOUNT_CACHE = 60.0
