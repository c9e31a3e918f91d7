"""Killing a running scan at a chosen point, for the resume tests (local and Ray)."""
import signal
import time


def kill_after_files(proc, folder, pattern: str, count: int, timeout: float,
                     poll: float = 0.05) -> list:
    """SIGKILL ``proc`` once ``folder`` holds ``count`` files matching ``pattern``; returns
    their names then.  Fails if the process exits first or nothing appears in ``timeout`` s."""
    deadline = time.time() + timeout
    try:
        while len(list(folder.glob(pattern))) < count:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, f"no {count} {pattern} in {folder} after {timeout} s"
            time.sleep(poll)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return sorted(p.name for p in folder.glob(pattern))
