"""A real two-node SLURM cluster (Debian's slurm-wlm + munge) on this host, sealed in a loopback-only network namespace.

Used by tests/test_slurm.py (a session fixture) and by hand:
    python tests/slurm_cluster.py up DIR      # start; prints the `run` prefix to use its clients
    python tests/slurm_cluster.py down DIR    # cancel jobs, stop the daemons, delete the namespace
    python tests/slurm_cluster.py logs DIR    # the tails of every daemon log

Every daemon, client and job runs through `nsenter --net=NS unshare --mount`, which binds our own
/etc/hosts (n1, n2 and this host's name -> 127.0.0.1) and /etc/resolv.conf (a stub resolver on
127.0.0.1 that answers NXDOMAIN at once) over the real ones, so nothing can leave the machine and no
lookup waits for a resolver that is not there. `ip netns exec` is not usable: it remounts /sys, and
slurmd 22.05 refuses a /sys without cgroup mounts. Daemons are stopped through their pid files, never
by name, so other clusters or developers on this host are left alone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch")
NODES = ("n1", "n2")
CTLD_PORT, SLURMD_PORTS = 6817, {"n1": 6818, "n2": 6819}  # a fresh namespace: nothing else holds ports

_ENTER = 'mount --bind "$HOSTS_FILE" /etc/hosts && mount --bind "$RESOLV_FILE" /etc/resolv.conf && exec "$@"'


def missing() -> str | None:
    """Why a cluster cannot start here (None when it can)."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return (
            f"SLURM/munge not installed ({', '.join(absent)} missing): apt-get install slurm-wlm slurmctld slurmd munge"
        )
    if os.geteuid() != 0:
        return "a SLURM test cluster needs root (network namespace, daemons)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def dns_stub(port: int = 53) -> None:
    """Answer every DNS query on 127.0.0.1 with NXDOMAIN (torch's rendezvous does reverse lookups of 127.0.0.1)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    while True:
        query, peer = sock.recvfrom(4096)
        if len(query) < 12:
            continue
        ident, flags = struct.unpack("!HH", query[:4])
        # QR=1, the query's opcode and RD bit, RA=1, RCODE=3 (NXDOMAIN); the question is echoed back.
        reply_flags = 0x8000 | (flags & 0x7900) | 0x0080 | 3
        sock.sendto(
            struct.pack("!HHHHHH", ident, reply_flags, struct.unpack("!H", query[4:6])[0], 0, 0, 0) + query[12:], peer
        )


class Cluster:
    """One slurmctld and two slurmd (n1, n2 on 127.0.0.1) with every file under `root`."""

    def __init__(self, root: Path, namespace: str | None = None):
        self.root = Path(root).resolve()
        ns_file = self.root / "namespace"  # a cluster started earlier (`up`) is found again by its folder
        self.namespace = namespace or (
            ns_file.read_text().strip() if ns_file.exists() else f"flowers-slurm-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "HOSTS_FILE": str(self.root / "hosts"),
            "RESOLV_FILE": str(self.root / "resolv.conf"),
        }

    # -- running things inside ---------------------------------------------------------------
    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside the cluster's namespace (daemons, clients, jobs)."""
        return [
            "nsenter",
            f"--net=/run/netns/{self.namespace}",
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            "sh",
            "-c",
            _ENTER,
            "sh",
        ]

    def run(
        self, cmd: list[str], env: dict | None = None, timeout: float = 60, check: bool = True, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run to the end; past `timeout` its whole process group is killed (a launcher's children included)."""
        with subprocess.Popen(
            [*self.prefix(), *cmd],
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            **kwargs,
        ) as child:
            try:
                out, err = child.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.communicate()
                raise
        proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}{proc.stderr}\n{self.logs()}")
        return proc

    def popen(self, cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix(), *cmd], env={**self.env, **(env or {})}, **kwargs)

    # -- life cycle --------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> Cluster:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "namespace").write_text(self.namespace)
        subprocess.run(["ip", "netns", "add", self.namespace], check=True)
        subprocess.run(["ip", "-n", self.namespace, "link", "set", "lo", "up"], check=True)
        # slurmctld resolves its own host to a configured, non-primary address.
        subprocess.run(["ip", "-n", self.namespace, "addr", "add", "127.0.0.2/8", "dev", "lo"], check=True)
        host = socket.gethostname()
        (self.root / "hosts").write_text(f"127.0.0.1 localhost {' '.join(NODES)} {host} {host.split('.')[0]}\n")
        (self.root / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        self._write_munge_key()
        self._write_conf()
        for sub in ("state", "spool-n1", "spool-n2"):
            (self.root / sub).mkdir(exist_ok=True)

        self._dns = self.popen(
            [sys.executable, str(Path(__file__).resolve()), "dns"],
            start_new_session=True,
            stdout=open(self.root / "dns.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        (self.root / "dns.pid").write_text(str(self._dns.pid))
        self.run(
            [
                "munged",
                "--force",
                f"--key-file={self.root / 'munge' / 'munge.key'}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.root / 'munged.pid'}",
                f"--log-file={self.root / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'seed'}",
            ]
        )
        self.run(["slurmctld"])
        for node in NODES:
            self.run(["slurmd", "-N", node])
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
            if states.count("idle") == len(NODES):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the nodes did not come up within {timeout:.0f} s: {states}\n{self.logs()}")

    def stop(self, timeout: float = 120) -> None:
        """Cancel every job, wait for an empty queue, stop the daemons by pid file, delete the namespace."""
        if not (Path("/run/netns") / self.namespace).exists():
            return
        try:
            self.run(["scancel", "--full", "--user=root"], check=False)
            deadline = time.time() + timeout
            while time.time() < deadline and self.run(["squeue", "-h"], check=False, timeout=20).stdout.strip():
                time.sleep(0.5)
        except (subprocess.TimeoutExpired, FileNotFoundError):
            pass
        # All at once (each takes about 2 s to shut down): no job is left that needs them.
        _stop_pid_files(
            [self.root / f"{name}.pid" for name in ("slurmd-n1", "slurmd-n2", "slurmctld", "munged", "dns")]
        )
        subprocess.run(["ip", "netns", "del", self.namespace], check=False)

    # -- jobs ----------------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
        proc = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the job is gone)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False).stdout.strip()
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait(
        self,
        job_id: int,
        states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
        timeout: float = 300,
    ) -> dict[str, str]:
        """Poll until the job is in one of `states` (a requeued job passes through REQUEUED and PENDING, not these)."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}\n{self.logs()}")

    def logs(self, lines: int = 40) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd-n1.log", "slurmd-n2.log", "munged.log"):
            path = self.root / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(out)

    # -- files ---------------------------------------------------------------------------------
    def _write_munge_key(self) -> None:
        folder = self.root / "munge"
        folder.mkdir(mode=0o700, exist_ok=True)
        key = folder / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)

    def _write_conf(self) -> None:
        r = self.root
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname=localhost Port={SLURMD_PORTS[n]} CPUs=2 RealMemory=4000 State=UNKNOWN"
            for n in NODES
        )
        self.conf.write_text(f"""\
ClusterName=flowerstest
SlurmctldHost=localhost
SlurmctldPort={CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job (default 120 s); short here, so that a test waits seconds.
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool-%n"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd-%n.pid"}
SlurmctldLogFile={r / "slurmctld.log"}
SlurmdLogFile={r / "slurmd-%n.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
SchedulerType=sched/builtin
# A requeued job becomes eligible cred_expire + 1 s after the requeue; the main scheduling loop then starts it at
# its next pass (every 60 s by default). 2 s keeps a requeue test short.
SchedulerParameters=sched_interval=2
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
PlugStackConfig={r / "plugstack.conf"}
SlurmdParameters=config_overrides
KillWait=10
InactiveLimit=0
MinJobAge=600
MailProg=/bin/true
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        (r / "plugstack.conf").write_text("")


def _alive(pid: int) -> bool:
    """The process runs: it exists and is not a zombie (a daemon's exit is reaped by pid 1, which in a container
    may never reap it; waiting for a zombie to go cost each cluster's teardown the whole timeout)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _stop_pid_files(pid_files: list[Path], timeout: float = 30) -> None:
    """SIGTERM to every pid named in the files, then wait for all of them together (SIGKILL after `timeout`)."""
    pids = []
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    deadline = time.time() + timeout
    while pids and time.time() < deadline:
        for pid in list(pids):
            try:  # reap it if it is our own child (the DNS stub)
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _alive(pid):
                pids.remove(pid)
        time.sleep(0.1)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "dns":
        dns_stub()
    elif command in ("up", "down", "logs") and len(sys.argv) == 3:
        cluster = Cluster(Path(sys.argv[2]))
        if command == "up":
            cluster.start()
            print(
                " ".join(f"{k}={cluster.env[k]}" for k in ("SLURM_CONF", "HOSTS_FILE", "RESOLV_FILE")),
                *cluster.prefix()[:-2],
                repr(_ENTER),
                "sh",
            )
        elif command == "down":
            cluster.stop()
        else:
            print(cluster.logs(200))
    else:
        sys.exit(__doc__)
