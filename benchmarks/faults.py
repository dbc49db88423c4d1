"""Faults at scale (issue 24): ``kill -9`` of ``dvc repro`` half-way through ``sam_masks`` and
again half-way through ``cams@cls``, then ``dvc repro`` to the end; ``kill -9`` of ``dvc push``
half-way, then ``push`` again and ``dvc pull`` into a fresh clone.

Two git + DVC projects of the embedded default are built as ``benchmarks/scale.py`` builds them
(same params: ``--images`` train images, ``--val`` eval images, short trainings): the reference
runs ``dvc repro`` uninterrupted (concurrently with the other, so the script takes about one
run's time on two cores); the faulted one is killed as follows. A kill is ``SIGKILL`` of the
``dvc`` process only (not its process group): the stage it runs must stop by itself (its
die-with-parent watchdog, ``stages.watch.die_with_parent``). The script watches the store's
file count and kills when about half the images are written: at that count it stops dvc's process
group (``SIGSTOP``, so that the kill lands at the count on a fast or loaded machine), kills ``dvc``,
and lets the stage continue (``SIGCONT``) to find its parent gone. DVC runs each stage command as
``$SHELL -c CMD``; ``--shell`` (default ``/bin/sh``, DVC's choice when SHELL is unset, as under cron,
SLURM and in containers) sets SHELL for the faulted project, and a shell that does not exec the
command (dash) stays between DVC and the stage, outliving the kill.

Checks (each printed as ``ok`` or ``FAIL``, and the script exits non-zero on any ``FAIL``):

- the stage process (and anything else under ``dvc``) is gone within 15 s of the kill;
- the orphan wrote at most what was in flight at the kill, then nothing more: the script lists
  the store (the remote for ``push``) with every process under ``dvc`` stopped, at the kill; once
  they are gone, the listing holds every entry complete at the kill plus at most the tasks in
  flight at it (``IN_FLIGHT_LOCAL``: one image for a stage on the ``local`` scheduler, none for
  the killed ``dvc push``), and ``SETTLE_S`` later it is unchanged;
- the rerun recomputes nothing that was complete: every image file present after a kill keeps
  its inode and mtime through the reruns (DVC's commit moves it into the cache and hardlinks it
  back, which keeps both), and the stage's log says how many images it resumed;
- every artifact (each file under ``cache/`` but the logs) and every output hash in ``dvc.lock``
  equals the reference run's; ``dvc status`` is clean;
- after the killed push, nothing but complete objects is in the remote; the second push sends
  the rest; every object in the remote hashes to its name; a fresh ``git clone`` + ``dvc pull``
  gives every output file byte-identical and a clean ``dvc status``.

    python benchmarks/faults.py --images 1000 [--val 8] [--shell /bin/sh] [--workdir DIR]

Ends with ``RATIO faults_ok=<checks passed / checks>`` (1.00: every check passed).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from harness import print_ratio, sh
from scale import bench_env, build, compare_trees

CHECKS: list[tuple[str, bool]] = []
#: Images a stage may still complete after the kill: on ``compute.scheduler: local`` (the
#: projects' scheduler, ``scale.TRAINING``) ``stages.execution.run_per_image`` runs one task at
#: a time in the stage's process, and the stage exits (SIGTERM raised as SystemExit between two
#: bytecodes) before it starts another, so only the image in hand can be renamed into the store.
IN_FLIGHT_LOCAL = 1
#: Seconds to wait once the processes are gone before listing the store again: four polls of
#: the die-with-parent watchdog (``stages.watch.die_with_parent``, 0.5 s); a stage still writing
#: would add an image every 0.02-0.1 s with the demo's models.
SETTLE_S = 2.0


def check(name: str, ok: bool, detail: str = "") -> bool:
    CHECKS.append((name, ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def list_files(folder: Path, suffix: str | None = None) -> set[str]:
    """Files under ``folder`` (relative paths), or of its entries those named ``*suffix``."""
    if not folder.is_dir():
        return set()
    if suffix is None:
        return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    with os.scandir(folder) as entries:
        return {e.name for e in entries if e.name.endswith(suffix)}


def descendants(pid: int) -> dict[int, str]:
    """Live descendants of ``pid``: {pid: command line}."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent_of[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
    found, frontier = {}, {pid}
    while frontier:
        children = {p for p, pp in parent_of.items() if pp in frontier and p not in found}
        for c in children:
            try:
                found[c] = (Path("/proc") / str(c) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                found[c] = "?"
        frontier = children
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def alive(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (or the process is gone): a system call it was in
    has returned, so nothing it does shows up later."""
    try:
        tasks = list((Path("/proc") / str(pid) / "task").iterdir())
    except OSError:
        return True
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] not in "TtZX":
            return False
    return True


def orphan_writes(at_kill: set[str], after: set[str], later: set[str], in_flight: int) -> list[str]:
    """What breaks "the store holds no more than the entries complete or in flight at the kill,
    and nothing more appears": ``at_kill``, the store's entries at the kill (every process
    stopped); ``after``, once the processes are gone; ``later``, a while after that. Empty when
    it holds."""
    problems = []
    lost = sorted(at_kill - after)
    if lost:
        problems.append(f"{len(lost)} entries complete at the kill are gone (e.g. {lost[:3]})")
    new = sorted(after - at_kill)
    if len(new) > in_flight:
        problems.append(f"{len(new)} entries appeared after the kill, more than the {in_flight} "
                        f"in flight (e.g. {new[:3]})")
    if later != after:
        problems.append(f"the listing changed {SETTLE_S:.0f} s after the processes were gone: "
                        f"{len(later - after)} new, {len(after - later)} gone")
    return problems


def kill_midway(args: list[str], repo: Path, env: dict, listing, target: int, what: str,
                log: Path, in_flight: int, total: int | None = None) -> None:
    """Run ``args``; SIGKILL the process when ``listing()`` (the names in the store it writes)
    reaches ``target`` entries; check that its descendants stop by themselves and that the store
    then holds at most the entries complete or (``in_flight`` of them) in flight at the kill,
    with nothing more ``SETTLE_S`` later."""
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(args)}  (to be killed at {target})\n")
        out.flush()
        proc = subprocess.Popen(args, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        while len(listing()) < target and proc.poll() is None:
            time.sleep(0.02)
    if proc.poll() is not None:
        check(f"{what}: the kill landed mid-way", False, f"{' '.join(args)} ended first ({proc.returncode})")
        return
    # Freeze dvc's process group at the count (one system call), so that the kill lands there
    # however fast the images go and however long listing the processes takes; the stage gets
    # the continue signal right after dvc's SIGKILL and must then stop by itself.
    os.killpg(proc.pid, signal.SIGSTOP)
    kids = descendants(proc.pid)
    for k in kids:
        _signal(k, signal.SIGSTOP)  # any child that left dvc's process group
    # SIGSTOP lands when a thread returns to user space: list the store once every thread is
    # stopped, so that no rename in progress completes after the listing
    deadline = time.time() + 10
    while not (all_stopped := all(stopped(p) for p in [proc.pid, *kids])) and time.time() < deadline:
        time.sleep(0.01)
    names_at_kill = listing()
    at_kill = len(names_at_kill)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for k in kids:
        _signal(k, signal.SIGCONT)
    killed_at = time.time()
    deadline = killed_at + 15
    while time.time() < deadline and any(alive(k) for k in kids):
        time.sleep(0.05)
    gone_after = time.time() - killed_at
    left = {k: c for k, c in kids.items() if alive(k)}
    stage_kids = {k: c for k, c in kids.items() if "wsss" in c}
    check(f"{what}: kill -9 of {args[0]} {args[1]} at {at_kill} files; its children stop by themselves",
          not left, f"children at the kill: {sorted(kids.values()) or 'none'}"
          + (f", gone {gone_after:.1f} s after the kill" if kids and not left else "")
          + (f"; still running after 15 s: {sorted(left.values())}" if left else ""))
    if what.startswith("repro"):
        check(f"{what}: a stage process was running under dvc at the kill", bool(stage_kids),
              f"{len(stage_kids)} wsss process(es)")
    if total is not None:
        check(f"{what}: the kill landed mid-way (images left for the rerun)", 0 < at_kill < total,
              f"{at_kill} of {total} at the kill")
    for k in left:  # ours: stop them so the rerun is not blocked (the check above failed)
        os.kill(k, signal.SIGKILL)
    time.sleep(0.5)
    after = listing()
    time.sleep(SETTLE_S)
    later = listing()
    problems = orphan_writes(names_at_kill, after, later, in_flight)
    if not all_stopped:
        problems.append("a process under dvc had not stopped 10 s after SIGSTOP: the listing at the "
                        "kill may miss what it wrote")
    check(f"{what}: the store holds no more than the entries complete or in flight ({in_flight}) "
          f"at the kill, and nothing more {SETTLE_S:.0f} s later", not problems,
          f"{at_kill} at the kill, {len(after)} once its processes were gone, {len(later)} "
          f"{SETTLE_S:.0f} s later" + (f"; {'; '.join(problems)}" if problems else ""))


def in_flight_tasks(repo: Path) -> int:
    """Images a stage of the project may have in flight at a kill (``IN_FLIGHT_LOCAL``)."""
    scheduler = yaml.safe_load((repo / "params.yaml").read_text())["compute"]["scheduler"]
    if scheduler != "local":
        raise SystemExit(f"compute.scheduler: {scheduler}: this script bounds the images in flight "
                         "for the local scheduler only")
    return IN_FLIGHT_LOCAL


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {e.name: (e.stat().st_ino, e.stat().st_mtime_ns)
            for e in os.scandir(folder) if e.name.endswith(".zip")}


def unchanged(before: dict, folder: Path) -> list[str]:
    now = snapshot(folder)
    return [name for name, key in before.items() if now.get(name) != key]


def last_log(repo: Path, name: str, pattern: str) -> re.Match | None:
    path = repo / "cache" / "logs" / f"{name}.log"
    found = None
    for line in path.read_text().splitlines() if path.exists() else []:
        m = re.search(pattern, line)
        if m:
            found = m
    return found


def lock_outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {f"{stage}:{o['path']}": o.get("md5") for stage, body in lock["stages"].items()
            for o in body.get("outs", [])}


def out_paths(repo: Path) -> list[str]:
    return sorted({p.split(":", 1)[1] for p in lock_outs(repo)})


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remote_objects(remote: Path) -> list[Path]:
    return [p for p in remote.rglob("*") if p.is_file()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=40, help="train images (dataset.demo.n_train)")
    ap.add_argument("--val", type=int, default=8, help="eval images (dataset.demo.n_val)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the projects here")
    ap.add_argument("--push-kill-at", type=float, default=0.5,
                    help="kill dvc push when this fraction of the objects is in the remote")
    ap.add_argument("--shell", default="/bin/sh",
                    help="SHELL for dvc (it runs each stage as SHELL -c CMD); '' keeps the environment's")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="wsss-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    n, n_all = args.images, args.images + args.val
    t0 = time.time()
    print(f"projects and logs under {work}; {n} train + {args.val} val images; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"stages run by {args.shell or os.environ.get('SHELL') or '/bin/sh'} -c", flush=True)
    try:
        env_ref = bench_env(work / "ref" / "home")
        ref = build(work / "ref", env_ref, n, args.val)
        env = bench_env(work / "faulted" / "home")
        if args.shell:
            env["SHELL"] = args.shell
        repo = build(work / "faulted", env, n, args.val)
        ref_log = open(work / "ref.log", "w")
        ref_proc = subprocess.Popen(["dvc", "repro"], cwd=ref, env=env_ref, stdout=ref_log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            sam = repo / "cache" / "sam_masks.zarr"
            cls = repo / "cache" / "cams" / "cls.zarr"
            # 1. kill -9 of dvc repro half-way through sam_masks
            stage_in_flight = in_flight_tasks(repo)
            kill_midway(["dvc", "repro"], repo, env, lambda: list_files(sam, ".zip"), n_all // 2,
                        "repro in sam_masks", log, stage_in_flight, total=n_all)
            sam_before = snapshot(sam)
            print(f"  {len(sam_before)} of {n_all} images complete after the kill "
                  f"({time.time() - t0:.0f} s)", flush=True)
            # 2. dvc repro again, kill -9 half-way through cams@cls
            kill_midway(["dvc", "repro"], repo, env, lambda: list_files(cls, ".zip"), n // 2,
                        "repro in cams@cls", log, stage_in_flight, total=n)
            m = last_log(repo, "sam_masks", r"(\d+) images computed, (\d+) already in the store")
            check("sam_masks resumed: computed only the images the kill left out",
                  m is not None and int(m[1]) == n_all - len(sam_before) and int(m[2]) == len(sam_before),
                  m[0] if m else "no summary line in cache/logs/sam_masks.log")
            changed = unchanged(sam_before, sam)
            check("sam_masks: every image complete at the kill kept its inode and mtime",
                  not changed, f"{len(sam_before) - len(changed)} of {len(sam_before)} unchanged"
                  + (f", e.g. {changed[:3]}" if changed else ""))
            cls_before = snapshot(cls)
            print(f"  {len(cls_before)} of {n} images complete after the kill "
                  f"({time.time() - t0:.0f} s)", flush=True)
            # 3. dvc repro to the end
            with open(log, "a") as out:
                done = subprocess.run(["dvc", "repro"], cwd=repo, env=env, stdout=out,
                                      stderr=subprocess.STDOUT)
            check("dvc repro after the kills completes", done.returncode == 0, f"exit {done.returncode}")
            m = last_log(repo, "cams@cls", r"cams@cls: (\d+) images computed, (\d+) resumed")
            check("cams@cls resumed: computed only the images the kill left out",
                  m is not None and int(m[1]) == n - len(cls_before) and int(m[2]) == len(cls_before),
                  m[0] if m else "no summary line in cache/logs/cams@cls.log")
            for name, before, folder in (("cams@cls", cls_before, cls), ("sam_masks", sam_before, sam)):
                changed = unchanged(before, folder)
                check(f"{name}: every image complete at the kill kept its inode and mtime after the "
                      "final repro", not changed, f"{len(before) - len(changed)} of {len(before)}")
            status = sh("dvc", "status", cwd=repo, env=env, check=False)
            check("dvc status is clean after the reruns", "Data and pipelines are up to date" in status,
                  status.strip()[-300:])
        finally:
            if ref_proc.poll() is None:
                print(f"  waiting for the reference run ({time.time() - t0:.0f} s)", flush=True)
            ref_proc.wait()
            ref_log.close()
        check("reference dvc repro (uninterrupted) completes", ref_proc.returncode == 0,
              f"exit {ref_proc.returncode}")
        a, b = lock_outs(ref), lock_outs(repo)
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        check("every output hash in dvc.lock equals the reference run's", not differ and bool(a),
              f"{len(a)} outputs" + (f"; differ: {differ}" if differ else ""))
        tops = sorted({p for p in out_paths(ref)} | {"cache/metrics", "cache/plots"})
        n_cmp, diffs = compare_trees(ref, repo, tops)
        check("every file under cache/ (logs aside) is byte-identical to the reference run's",
              not diffs and n_cmp > 0, f"{n_cmp} files" + (f"; {diffs[:5]}" if diffs else ""))
        print(f"  repro faults done ({time.time() - t0:.0f} s)", flush=True)

        # 4. kill -9 of dvc push half-way, push again, pull into a fresh clone
        remote = work / "remote"
        sh("dvc", "remote", "add", "-d", "store", remote, cwd=repo, env=env)
        sh("git", "add", "-A", cwd=repo, env=env)
        sh("git", "commit", "-q", "-m", "run", cwd=repo, env=env)
        objects = len(list_files(repo / ".dvc" / "cache" / "files"))
        # in flight: none; the killed dvc push is the only writer, and its threads die with it
        kill_midway(["dvc", "push"], repo, env, lambda: list_files(remote),
                    max(1, int(objects * args.push_kill_at)), "push", log, 0)
        named = re.compile(r"files/md5/[0-9a-f]{2}/[0-9a-f]{30}(\.dir)?")
        in_flight = re.compile(r"files/md5/[0-9a-f]{2}/\.[\w-]+\.tmp")
        after = [str(p.relative_to(remote)) for p in remote_objects(remote)]
        after_kill = [f for f in after if named.fullmatch(f)]
        tmp_left = [f for f in after if in_flight.fullmatch(f)]
        bad = [f for f in after if not named.fullmatch(f) and not in_flight.fullmatch(f)]
        check("after the killed push the remote holds objects under their hash names (and DVC's "
              "temporary upload files)", not bad,
              f"{len(after_kill)} of {objects} objects, {len(tmp_left)} temporary"
              + (f"; others: {bad[:5]}" if bad else ""))
        out = sh("dvc", "push", cwd=repo, env=env)
        m = re.search(r"(\d+) files? pushed", out)
        pushed = int(m[1]) if m else 0 if "Everything is up to date" in out else None
        in_remote = sum(1 for p in remote_objects(remote) if named.fullmatch(str(p.relative_to(remote))))
        cloud = sh("dvc", "status", "-c", cwd=repo, env=env, check=False)
        # (the local cache also holds the run cache's copies of uncached metrics and plots,
        # which a plain push does not send: hence the remote's count, not the cache's)
        check("the second push sends exactly the rest; cache and remote in sync", pushed is not None
              and pushed + len(after_kill) == in_remote and "in sync" in cloud,
              (f"{pushed} pushed" if pushed is not None else out.strip()[-200:]) + f" after {len(after_kill)}; "
              f"{in_remote} objects in the remote; dvc status -c: {cloud.strip()[-80:]}")
        wrong = []
        for p in remote_objects(remote):
            rel = p.relative_to(remote)
            if not named.fullmatch(str(rel)):
                continue
            if md5(p) != rel.parts[-2] + rel.parts[-1].removesuffix(".dir"):
                wrong.append(str(rel))
        check("the push was killed mid-way (the second push had objects left to send)",
              0 < len(after_kill) < in_remote, f"{len(after_kill)} of {in_remote} objects at the kill")
        check("every object in the remote hashes to its name", not wrong,
              f"{in_remote} objects" + (f"; wrong: {wrong[:5]}" if wrong else ""))
        still = [str(p.relative_to(remote)) for p in remote_objects(remote)
                 if in_flight.fullmatch(str(p.relative_to(remote)))]
        # DVC's own: an upload goes to a temporary name in the object's folder, renamed when
        # complete; a killed push leaves the ones in flight, and no later push or pull reads or
        # removes them (`find REMOTE -name '.*.tmp' -delete` while no push runs).
        print(f"NOTE DVC's temporary upload files left in the remote by the killed push: {len(still)}"
              + (f" ({still[:3]}, {sum((remote / f).stat().st_size for f in still)} bytes)" if still else ""),
              flush=True)
        clone = work / "clone"
        sh("git", "clone", "-q", repo, clone, cwd=work, env=env)
        out = sh("dvc", "pull", cwd=clone, env=env, check=False)
        check("dvc pull into a fresh clone succeeds", "ERROR" not in out, out.strip().splitlines()[-1])
        n_cmp, diffs = compare_trees(repo, clone, out_paths(repo) + ["cache/metrics", "cache/plots"])
        check("the clone's outputs are byte-identical to the pushed ones", not diffs and n_cmp > 0,
              f"{n_cmp} files" + (f"; {diffs[:5]}" if diffs else ""))
        status = sh("dvc", "status", cwd=clone, env=env, check=False)
        check("dvc status is clean in the clone", "Data and pipelines are up to date" in status,
              status.strip()[-300:])
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    passed = sum(ok for _, ok in CHECKS)
    print(f"\n{passed} of {len(CHECKS)} checks passed; {time.time() - t0:.0f} s; "
          f"load average at end {os.getloadavg()[0]:.1f}")
    print_ratio("faults_ok", passed / max(len(CHECKS), 1))
    if passed != len(CHECKS):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
