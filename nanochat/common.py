"""
Small shared utilities: where files go, which device to run on, torchrun DDP
setup, logging, atomic file writes and the peak-FLOPs table used for MFU.
"""

import logging
import os
import re
import shutil
import stat
import tempfile
import time

# expandable segments: less fragmentation when a big model fills the GPU (set before CUDA starts)
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# -----------------------------------------------------------------------------
# Logging: one colored formatter, so every script prints the same way.

class ColoredFormatter(logging.Formatter):
    COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m",
              "ERROR": "\033[31m", "CRITICAL": "\033[35m"}
    RESET = "\033[0m"

    def format(self, record):
        msg = super().format(record)
        color = self.COLORS.get(record.levelname, "")
        return msg.replace(record.levelname, f"{color}{record.levelname}{self.RESET}", 1) if color else msg


def setup_default_logging():
    handler = logging.StreamHandler()
    handler.setFormatter(ColoredFormatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


setup_default_logging()
logger = logging.getLogger(__name__)


def print0(*args, **kwargs):
    """print() on rank 0 only, so torchrun output is not repeated N times."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)

# -----------------------------------------------------------------------------
# Files

def require_positive(args, names):
    """SystemExit with one line for the first of these integer flags (argparse names) below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}={getattr(args, name)}: must be a positive integer")


def get_base_dir():
    """Everything nanochat writes (data, tokenizer, checkpoints, reports) lives here.
    Set NANOCHAT_BASE_DIR to move it; default ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def atomic_write(path, write_fn, mode="wb"):
    """Write a file so that readers see either the old file or the whole new one,
    never half of it: write to a temp file in the same directory, fsync, rename, fsync
    the directory (so the rename itself survives a crash, in order: a checkpoint's
    metadata, written last, never outlives the files it names)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # (a platform that cannot open a directory: the rename is done, only its durability is not forced)
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # some file systems refuse fsync on a directory (EINVAL); the file is in place
        pass
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


# Sandbox work directories (nanochat/execution.py) are tempfile.gettempdir()/nanochat-exec-*;
# named with exec_dir_prefix() (nanochat-exec-<pid>-XXXX) they are removed as soon as the
# process that made them is gone. A host killed mid-execution leaves its directory behind.
EXEC_DIR_PREFIX = "nanochat-exec-"


def exec_dir_prefix():
    """The mkdtemp prefix of this process's sandbox directories: nanochat-exec-<pid>-."""
    return f"{EXEC_DIR_PREFIX}{os.getpid()}-"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _cwds_of_live_processes():
    """The working directories of the processes we can see (a sandbox child runs in its dir)."""
    cwds = set()
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if pid.isdigit():
            try:
                cwds.add(os.readlink(f"/proc/{pid}/cwd"))
            except OSError:
                pass
    return cwds


def clean_stale_exec_dirs(root=None, legacy_age_s=6 * 3600):
    """Remove sandbox directories left by killed processes: nanochat-exec-<pid>-* of ours
    whose pid is gone, and unnamed ones (nanochat-exec-XXXX, no pid) untouched for
    legacy_age_s (an execution lasts seconds). A directory that a live process works in
    is kept, and so is every directory of another user or of a live pid. Returns the
    removed paths. Training and serving call it at start (compute_init, chat_web)."""
    root = root or tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(EXEC_DIR_PREFIX)]
    except OSError:
        return []
    stale = []
    for name in names:
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        m = re.match(rf"{EXEC_DIR_PREFIX}(\d+)-", name)
        if m and int(m.group(1)) == os.getpid():
            continue
        if m:
            gone = not _pid_alive(int(m.group(1)))
        else:
            gone = time.time() - st.st_mtime > legacy_age_s
        if gone:
            stale.append(path)
    if stale:
        in_use = _cwds_of_live_processes()
        stale = [p for p in stale if not any(c == p or c.startswith(p + os.sep) for c in in_use)]
    for path in stale:
        try:
            os.chmod(path, 0o700)
        except OSError:
            pass
        for dirpath, dirnames, _ in os.walk(path):  # the sandboxed code may have made parts unreadable
            for d in dirnames:
                if not os.path.islink(os.path.join(dirpath, d)):
                    try:
                        os.chmod(os.path.join(dirpath, d), 0o700)
                    except OSError:
                        pass
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        logger.info(f"removed {len(stale)} sandbox director{'y' if len(stale) == 1 else 'ies'} of ended processes "
                    f"from {root}")
    return stale

# -----------------------------------------------------------------------------
# Devices and distributed setup

DEVICE_TYPES = ("cuda", "xla", "mps", "cpu")


def xla_available():
    """torch_xla is an optional extra; treat it as usable only when PJRT_DEVICE says where to run."""
    if not os.environ.get("PJRT_DEVICE"):
        return False
    try:
        import torch_xla  # noqa: F401
        return True
    except ImportError:
        return False


def autodetect_device_type(override=None, xla=True, script=None):
    """Pick the best device: cuda > xla (TPU) > mps > cpu. `override` (a --device_type flag) wins.
    xla=False: a script without the TPU path (SPMD mesh, a graph sync per step: base_train has
    them) skips XLA, and refuses --device_type=xla, naming `script`."""
    if override == "xla" and not xla:
        raise SystemExit(f"{script or 'this script'} does not run on XLA (TPU training is base_train's: "
                         f"docs/TPU_SETUP.md); run it from the base checkpoint on a GPU or with --device_type=cpu")
    if override:
        if override not in DEVICE_TYPES:
            raise ValueError(f"unknown device type {override!r}; choose one of {', '.join(DEVICE_TYPES)}")
        return override
    if torch.cuda.is_available():
        return "cuda"
    if xla and xla_available():
        return "xla"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def is_ddp_requested():
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; their presence means we run distributed."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def get_dist_info():
    if is_ddp_requested():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(device_type="cuda", seed=42):
    """Seed, set precision knobs and (under torchrun) join the process group.
    Returns (ddp, rank, local_rank, world_size, device)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device_type=cuda but no CUDA device is visible; use --device_type=cpu")
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.set_float32_matmul_precision("high")  # tf32 for the few fp32 matmuls left
    ddp, rank, local_rank, world_size = get_dist_info()
    if local_rank == 0:
        clean_stale_exec_dirs()
    if device_type == "xla":
        if ddp:  # SPMD: one process per host drives all its chips; no process group to join
            raise SystemExit("--device_type=xla runs as one process that drives every chip of the host (XLA SPMD): "
                             "start it with python -m, not torchrun (docs/TPU_SETUP.md)")
        import torch_xla
        import torch_xla.runtime as xr
        xr.use_spmd()  # before the runtime starts; nanochat/tpu.py shards over the mesh
        device = torch_xla.device()
    elif ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    else:
        device = torch.device(device_type)
        if ddp:
            dist.init_process_group(backend="gloo")
    if rank == 0:
        logger.info(f"device={device} world_size={world_size}")
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def compute_dtype(device_type):
    """bf16 where the hardware does it natively (Ampere+ GPUs, TPUs); fp32 elsewhere,
    because bf16 on CPU is slow and loses precision for no speed gain."""
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device_type == "xla":  # a TPU; XLA's CPU backend (PJRT_DEVICE=CPU, the tests) computes like the CPU
        return torch.float32 if os.environ.get("PJRT_DEVICE", "").upper() == "CPU" else torch.bfloat16
    return torch.float32


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "xla":
        import torch_xla
        torch_xla.sync()


def max_memory_allocated_mib(device_type):
    return torch.cuda.max_memory_allocated() / 2**20 if device_type == "cuda" else 0.0

# -----------------------------------------------------------------------------
# Peak dense bf16 FLOP/s (for MFU) and memory bytes/s (for engine_bench's bandwidth use), from
# the vendors' spec sheets (no sparsity); None where we list no figure. First match wins, so
# more specific names come first.

PEAKS = [
    (r"H200", 989e12, 4.8e12),
    (r"H100.*PCIe", 756e12, 2.0e12),
    (r"H100 NVL", 835e12, 3.9e12),
    (r"H100", 989e12, 3.35e12),          # SXM
    (r"H800", 989e12, 3.35e12),
    (r"GB200", 2500e12, None),           # before B200, which it contains
    (r"B200", 2250e12, 8.0e12),
    (r"A100.*80GB.*PCIe", 312e12, 1.935e12),
    (r"A100.*80GB", 312e12, 2.039e12),
    (r"A100", 312e12, 1.555e12),         # 40GB
    (r"A10G", 125e12, None),
    (r"L40S", 362e12, 0.864e12),
    (r"L40\b", 181e12, 0.864e12),
    (r"L4\b", 121e12, 0.3e12),
    (r"RTX 4090", 165e12, 1.008e12),
    (r"RTX 3090", 71e12, None),
    (r"v6e|TPU v6", 918e12, None),
    (r"v5p", 459e12, None),
    (r"v5e|v5 lite|v5litepod", 197e12, None),
    (r"v4", 275e12, None),
]


def _peak(device_name, column):
    return next((row[column] for row in PEAKS if re.search(row[0], device_name, re.IGNORECASE)), None)


def get_peak_flops(device_name):
    """Peak bf16 FLOP/s for a device name such as 'NVIDIA H100 80GB HBM3'; inf if unknown
    (so MFU prints as 0% instead of a made-up figure)."""
    return _peak(device_name, 1) or float("inf")


def get_peak_bandwidth(device_name):
    """Peak memory bytes/s for a device name; None if unknown (no utilization printed)."""
    return _peak(device_name, 2)


def device_name(device_type):
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    if device_type == "xla":
        try:  # the kind ("TPU v6 lite"): PEAKS matches it; the hardware type alone is just "TPU"
            import torch_xla.core.xla_model as xm
            return str(xm.xla_device_kind(torch_xla_device()))
        except Exception:
            return "xla"
    return device_type


def torch_xla_device():
    import torch_xla
    return torch_xla.device()


class DummyWandb:
    """Stands in for a wandb run when --run=dummy, so training code logs unconditionally."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run, project, config):
    """A wandb run on rank 0 unless run == "dummy"; DummyWandb otherwise."""
    if run == "dummy" or int(os.environ.get("RANK", 0)) != 0:
        return DummyWandb()
    import wandb
    return wandb.init(project=project, name=run, config=config)


def autocast_for(device_type):
    """bf16 autocast where the device computes in bf16 (compute_dtype), else a no-op."""
    dtype = compute_dtype(device_type)
    return torch.amp.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)

# -----------------------------------------------------------------------------
# Collectives for the distributed optimizers. NCCL has reduce_scatter_tensor and
# all_gather_into_tensor; gloo (CPU tests) lacks the first, so it gets the
# equivalent all_reduce + slice. With one process every call is a plain copy.


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def reduce_scatter_mean(output, input):
    """output (n, ...) <- this rank's n-slice of the mean over ranks of input (W*n, ...)."""
    W = world_size()
    if W == 1:
        output.copy_(input)
        return
    if dist.get_backend() == "nccl":
        dist.reduce_scatter_tensor(output, input, op=dist.ReduceOp.AVG)
        return
    buf = input.clone()
    dist.all_reduce(buf)
    n = output.size(0)
    output.copy_(buf[dist.get_rank() * n:(dist.get_rank() + 1) * n]).div_(W)


def all_gather_into(output, input):
    """output (W*n, ...) <- every rank's input (n, ...), in rank order."""
    if world_size() == 1:
        output.copy_(input)
        return
    if dist.get_backend() == "nccl":
        dist.all_gather_into_tensor(output, input)
        return
    dist.all_gather(list(output.chunk(world_size())), input.contiguous())


def all_reduce_mean(t):
    W = world_size()
    if W > 1:
        if dist.get_backend() == "nccl":
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
        else:
            dist.all_reduce(t)
            t.div_(W)
