"""Which replica runs which unit: claims, heartbeats, leases and backup copies, at a cost to the
filesystem's metadata server that stays flat in the number of replicas.

- A claim is a file `work/claims/<attempt>/<unit>` created exclusively (one create); its text is the
  holder. Replicas start spread over the units (replica i at the i-th point of a van der Corput
  sequence) and walk on from there, so they do not contend for the same units.
- A failed claim means another replica got there: one listing of the claims folder then shows every
  unit taken so far, and the replica jumps to a random unit still free. No unit held by another is
  polled while free ones are left.
- When no unit is free, an idle replica runs a backup copy of a unit still held by another
  (`<unit>.b<k>`, at most `client.backups` copies per unit), as MapReduce does for stragglers: the
  first commit wins (`commits.commit_unit` links, never replaces), the loser's rows are discarded and
  counted. A copy starts only when it can commit first: the holder's pace (seconds per unit committed)
  and last commit are in its progress record (one open), this replica's own pace is measured here,
  and the copy must be expected to finish a quarter of its own time before the holder. Otherwise the
  first idle replica to look at the unit watches it (`<unit>.w<when the holder should commit>`; a
  watch takes no copy slot): it runs nothing, and starts the copy if the holder gets twice its pace
  late or misses two heartbeats. Any other idle replica reads from the watch's name, without opening
  anything, whether a copy of its own would commit first. Between equal replicas no copy runs; a
  straggler's unit is copied at once. A holder that has been silent for `client.lease_s` (no
  heartbeat) loses its claim to the first idle replica that looks. An idle replica looks after 1, 2,
  4 s... up to `lease_s / 4` (at most 10 s), two listings (claims and results) each time, and at once
  when a unit of its own commits; a watcher looks at its holder's record only, when it is due. An
  idle replica with nothing to do (every unit left has all its copies running, or is watched and it
  cannot beat the holder) ends, freeing its nodes: a tail of 1,000 replicas costs about two looks
  each, not a poll every few seconds.
- A replica's heartbeat is its progress file, `work/progress/<owner>.json` (one utime every
  `lease_s / 4`, skipped when the file was written since: it is after each commit). Only one attempt's
  replicas run at a time (one front-end per run_dir), so an owner's file speaks for this attempt.

Every filesystem call goes through `fsops`, which counts it; `bench/scale.py` drives this class in
virtual time (the clock is a parameter) to show the cost at 1,000 replicas.
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from . import fsops
from .rundir import RunPaths
from .sinks import sink_for

WAIT = "wait"


@dataclass(frozen=True)
class Claim:
    unit: int
    copy: int = 0  # 0: the unit's own run; k >= 1: its k-th backup copy


def claim_name(unit: int, copy: int = 0) -> str:
    return f"{unit:08d}" + (f".b{copy}" if copy else "")


def watch_name(unit: int, finish: float) -> str:
    """A watch of a unit: the holder is expected to commit it by `finish` (whole seconds on the replicas'
    clock), so any idle replica reads from the listing whether a copy of its own would commit first."""
    return f"{unit:08d}.w{max(0, int(finish))}"


def parse_watch(name: str) -> tuple[int, int] | None:
    """(unit, finish) of a watch's name; None for anything else."""
    base, _, finish = name.partition(".w")
    if len(base) != 8 or not base.isdigit() or not finish.isdigit():
        return None
    return int(base), int(finish)


def parse_claim(name: str) -> tuple[int, int] | None:
    """(unit, copy) of a claim file's name; None for anything else (a takeover's temporary file)."""
    base, _, copy = name.partition(".b")
    if not base.isdigit() or (copy and not copy.isdigit()):
        return None
    return int(base), int(copy or 0)


def spread(index: int) -> float:
    """The index-th point of the van der Corput sequence in [0, 1): any first R replicas start evenly
    spread over the units, whatever R is (no replica needs to know how many there are)."""
    point, scale = 0.0, 0.5
    while index:
        index, bit = divmod(index, 2)
        point += bit * scale
        scale /= 2
    return point


class Scheduler:
    """One replica's claims in one attempt of a run.

    todo: the units this attempt must commit, in plan order. retry: those among them that are committed
    already and are redone (retry_failed=true); their commit replaces, and retried(unit) says whether it
    happened. index: the replica's number (where it starts). clock: time.time, or a virtual clock.
    """

    def __init__(self, paths: RunPaths, attempt: str, owner: str, todo: Iterable[int], index: int = 0,
                 lease_s: float = 60.0, backups: int = 1, clock: Callable[[], float] = time.time,
                 retry: Iterable[int] = (), retried: Callable[[int], bool] | None = None, seed=None, gate=None):
        self.paths, self.attempt, self.owner = paths, attempt, owner
        self.sink = sink_for(paths)  # which units are committed: the run's output.format knows their files
        self.folder = paths.claims / attempt
        self.beat_file = paths.progress / f"{owner}.json"
        self.written_at = float("-inf")  # when the progress file was last written (a heartbeat too)
        # ascending unit numbers; an int64 array is shared, not copied (bench/scale.py runs 1,000 replicas in one
        # process: every per-replica structure here is O(units) bits, or O(units left) once no unit is free)
        self.todo = np.asarray(todo if isinstance(todo, np.ndarray) else list(todo), dtype=np.int64)
        self.taken = np.zeros(len(self.todo), dtype=bool)  # claimed by someone, as far as this replica knows
        self.cursor = int(spread(index) * len(self.todo))
        self.lease_s, self.backups, self.clock = lease_s, backups, clock
        self.retry, self.retried = set(retry), retried or (lambda unit: False)
        self.rng = random.Random(seed if seed is not None else f"{attempt}/{owner}")
        self.held: dict[int, int] = {}  # unit -> copy, claimed and not yet committed or given up
        self.finished: set[int] = set()  # units this replica committed or gave up (never copied by it again)
        self.lock = threading.Lock()  # next() runs in a worker thread, release() in the client's loop
        self.reclaim: list[int] = []  # a requeued replica's own earlier claims, taken back first
        self.in_tail = False  # no unit was free at the last look
        self.next_look = self.next_lease_check = float("-inf")
        self.idle_looks = 0  # looks in a row that found nothing: the next one waits longer
        self.holders: dict[tuple[int, int], str] = {}  # (unit, copy) -> holder, as last read
        self.backup_claims: dict[int, set[int]] = {}  # unit -> its backup copies claimed, as last listed
        self.watch_claims: dict[int, int] = {}  # unit -> when its holder is expected to commit it, as its watch says
        self.left: np.ndarray | None = None  # units not committed at the last look (None: not looked yet)
        self.backup_copies = self.takeovers = 0
        # units this replica watches (unit -> when to look at its holder again): their holder is expected to commit
        # first, so a copy would only be discarded; the watch (a claim named watch_name) keeps this replica ready to
        # run the copy if the holder falls behind or goes silent, and lets idle replicas that cannot beat it end
        self.watching: dict[int, float] = {}
        self.watches = 0  # backup claims made on watch (started later or not at all)
        self.watch_look = False  # the next look is for the units on watch only (no listing)
        # this replica's own pace: time from its first claim to its last unit done, over the units done
        self.first_claim_at: float | None = None
        self.last_done_at, self.units_done = 0.0, 0
        self.seen: dict[str, tuple[float | None, float | None, float | None]] = {}  # holder -> pace, as read this look
        # data.follow (orchestrator.follow.Gate): a unit is claimed once the run followed has committed it; the
        # units not yet committed there are `blocked` (and marked taken, so no claim goes to them)
        self.gate = gate
        self.blocked = np.zeros(len(self.todo), dtype=bool)
        self.upstream_wait = False  # the last look found only units the run followed has still to commit
        if gate is not None:
            self.blocked = ~np.isin(self.todo, np.asarray(sorted(gate.ready()), dtype=np.int64))
            self.taken |= self.blocked
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def poll_s(self) -> float:
        """How long an idle replica waits before it looks for work again (two listings): 1 s after the first
        look that found nothing, doubling up to a quarter lease (at most 10 s)."""
        wait = min(2.0 ** max(0, self.idle_looks - 1), self.lease_s / 4, 10.0)
        return min(wait, self.UPSTREAM_POLL_S) if self.upstream_wait else wait

    UPSTREAM_POLL_S = 1.0  # how often a replica waiting on the run it follows looks for its next commits

    def _open_gate(self) -> np.ndarray:
        """Units the run followed committed since the last look are claimable (one listing there); returns the
        units still blocked among those left."""
        if self.gate is None or not self.blocked.any():
            return np.zeros(0, dtype=np.int64)
        ready = np.asarray(sorted(self.gate.ready()), dtype=np.int64)
        opened = self.blocked & np.isin(self.todo, ready)
        self.blocked &= ~opened
        self.taken[opened] = False  # claimed ones are marked again by the listing that follows
        return self.todo[self.blocked]

    @property
    def beat_s(self) -> float:
        return self.lease_s / 4

    def wrote(self) -> None:
        """The progress file was just written: that was a heartbeat."""
        self.written_at = self.clock()

    def beat(self) -> None:
        """This replica is alive: its claims stay its own (call every beat_s)."""
        now = self.clock()
        if now - self.written_at >= self.beat_s * 0.9:
            fsops.touch(self.beat_file, now)

    def resume(self, units: Iterable[int]) -> None:
        """Units this replica held before its job was requeued (from its progress record): its own again."""
        self.reclaim = [int(u) for u in self.todo[self._slots(list(units))]]

    def release(self, unit: int) -> None:
        """The unit is committed (by anyone) or given up: no longer held."""
        with self.lock:
            copy = self.held.pop(unit, None)
            self.finished.add(unit)
            if self.watching.pop(unit, None) is not None:
                # the unit watched is done: look for work (or end) at the next ask
                self.next_look, self.watch_look = float("-inf"), False
            elif copy is not None:
                self.units_done += 1
                self.last_done_at = self.clock()

    def next(self) -> Claim | str | None:
        """The next unit to run, WAIT (nothing to take now: look again after poll_s), or None: nothing is
        left for this replica, because every unit of this attempt is committed or (with backups) every
        unit left is running with all its copies, or watched by a replica it could not beat. A replica that
        ends so frees its nodes at the tail of a run instead of polling; the holders, copies and watchers
        finish the rest, and take over a silent one's claim."""
        with self.lock:
            got = self._next()
            if isinstance(got, Claim) and self.first_claim_at is None:
                self.first_claim_at = self.clock()
            return got

    def _next(self) -> Claim | str | None:
        while self.reclaim:
            unit = self.reclaim.pop()
            name = claim_name(unit)
            if fsops.read_text(self.folder / name) == self.owner and not self.sink.is_done(unit):
                self.taken[self._slots([unit])] = True
                self.held[unit] = 0
                return Claim(unit)
        i = self._free_from(self.cursor)
        listed = None  # the claims folder's names, when listed just now (the tail's look uses them)
        while i is not None:
            unit = int(self.todo[i])
            self.taken[i] = True
            if fsops.create_exclusive(self.folder / claim_name(unit), self.owner):
                self.cursor = i + 1
                self.held[unit] = 0
                self.in_tail, self.idle_looks = False, 0
                return Claim(unit)
            listed = fsops.listdir(self.folder)
            self._learn(listed)  # another replica got there: see all that is taken
            i = self._random_free()
        return self._tail(listed)

    def _free_from(self, start: int) -> int | None:
        free = np.flatnonzero(~self.taken[start:])
        if free.size:
            return start + int(free[0])
        free = np.flatnonzero(~self.taken[:start])
        return int(free[0]) if free.size else None

    def _random_free(self) -> int | None:
        free = np.flatnonzero(~self.taken)
        return int(free[self.rng.randrange(free.size)]) if free.size else None

    def _slots(self, units) -> np.ndarray:
        """Where these units are in todo (units not in it are left out)."""
        units = np.asarray(units, dtype=np.int64)
        at = np.searchsorted(self.todo, units)
        inside = at < len(self.todo)
        at, units = at[inside], units[inside]
        return at[self.todo[at] == units]

    def _learn(self, names: list[str]) -> np.ndarray:
        """Mark every claimed unit taken; note the backup copies claimed. Returns the claimed units."""
        units, backups, watches = [], {}, {}
        for name in names:
            if len(name) == 8 and name.isdigit():
                units.append(int(name))
            elif ".b" in name:
                parsed = parse_claim(name)
                if parsed is not None:
                    backups.setdefault(parsed[0], set()).add(parsed[1])
            elif ".w" in name:
                watch = parse_watch(name)
                if watch is not None:
                    watches[watch[0]] = min(watch[1], watches.get(watch[0], watch[1]))
        self.watch_claims = watches
        claimed = np.asarray(units, dtype=np.int64)
        self.taken[self._slots(claimed)] = True
        self.backup_claims = backups
        return claimed

    def _copies(self, unit: int) -> set[int]:
        return {0} | self.backup_claims.get(unit, set())

    def _tail(self, listed: list[str] | None = None) -> Claim | str | None:
        now = self.clock()
        if now < self.next_look:
            return WAIT
        if self.watch_look and listed is None:  # a look for the units on watch: their holders' records tell
            self.watch_look, self.seen = False, {}
            for unit in [u for u in self.watching if u not in self.retry and self.sink.is_done(u)]:
                del self.watching[unit]  # its holder committed it (one stat): this replica looks for work, or ends
                self.held.pop(unit, None)
                self.finished.add(unit)
            started = self._watched(now)
            if started is not None:
                return started
            if self.watching and self._watch_until() > now:
                self.next_look, self.watch_look = self._watch_until(), True
                return WAIT
        self.watch_look = False
        self.idle_looks += 1
        self.next_look = now + self.poll_s
        self.in_tail = True
        self.seen = {}
        blocked = self._open_gate()
        claimed = self._learn(fsops.listdir(self.folder) if listed is None else listed)
        committed = np.asarray(sorted(self.sink.done_units()), dtype=np.int64)
        left = self.todo if self.left is None else self.left
        done = np.isin(left, committed)
        for i in np.flatnonzero(done):  # a retried unit is done once redone, not because it was committed before
            if int(left[i]) in self.retry and not self.retried(int(left[i])):
                done[i] = False
        left = self.left = left[~done]
        waiting = left[np.isin(left, blocked)]  # units the run followed has still to commit
        self.upstream_wait = False
        if waiting.size:
            if self.gate.live():
                self.upstream_wait = True
                self.next_look = now + self.poll_s
            else:  # it has ended: what it did not commit never comes; this replica does what it can, then ends
                left = self.left = left[~np.isin(left, blocked)]
                waiting = waiting[:0]
        if not left.size:
            return None
        unclaimed = left[~np.isin(left, claimed) & ~np.isin(left, waiting)]
        if unclaimed.size:  # claimed and given up, or missed: take it like any free unit
            self.taken[self._slots(unclaimed)] = False
            self.next_look = float("-inf")
            return self._next()
        started = self._watched(now)
        if started is not None:
            return started
        held_up = set(waiting.tolist())
        others = [int(u) for u in left if int(u) not in self.held and int(u) not in self.finished
                  and int(u) not in held_up]
        if not others and held_up:  # the run followed has more to commit: look again soon
            return WAIT
        if not others:  # all that is left is this replica's own: look again when it commits one, not before
            self.next_look = self._watch_until()
            self.watch_look = bool(self.watching)
            return WAIT
        self.rng.shuffle(others)
        if self.backups:
            got = self._copy_or_watch(others, now)
            if got is not None:
                return got
        if now >= self.next_lease_check:  # twice a lease, a few units: holders silent for a lease lose them
            self.next_lease_check = now + self.lease_s / 2
            for unit in others[:4]:
                for copy in sorted(self._copies(unit)):
                    if self._take_over(unit, copy, now):
                        self.held[unit] = copy
                        self.takeovers += 1
                        self.idle_looks = 0
                        return Claim(unit, copy)
                    if copy == 0:  # its holder is alive and commits it: its copies' claims need no look
                        break
        if self.backups and not self.held and not held_up and \
                all(len(self._copies(u)) > self.backups or u in self.watch_claims for u in others):
            return None  # every unit left runs with all its copies, or is watched: nothing here for this replica
        if self.watching:
            self.next_look = min(self.next_look, self._watch_until())
        return WAIT

    # a backup copy is started only when it is expected to commit before its unit's holder by this share of its
    # own run time; a holder later than twice its usual time a unit (a node gone slow, an engine stuck), or silent
    # for half a lease (two heartbeats missed: dead, maybe), is copied
    BEAT_BY = 0.25
    LATE = 2.0

    def _copy_or_watch(self, others: list[int], now: float) -> Claim | str | None:
        """Once no unit is free: a backup copy of a unit held by another when it would commit before the holder,
        else a watch of a unit nobody watches yet (None: neither). A watched unit's name says when its holder is
        expected to commit, so this replica copies the one it would gain most on without reading anything; an
        unwatched one (the fewest copies first: a straggler's unit gets one backup before any gets two) costs a
        look at its holder's record, and the first idle replica to look watches it, or copies it."""
        free = {u: k for u in others
                if (k := next((k for k in range(1, self.backups + 1) if k not in self._copies(u)), None)) is not None}
        mine = self._pace()
        watched = [u for u in free if u in self.watch_claims and u not in self.watching]
        if watched and mine is not None:
            unit = max(watched, key=lambda u: self.watch_claims[u])
            if now + mine * (1 + self.BEAT_BY) < self.watch_claims[unit] and \
                    fsops.create_exclusive(self.folder / claim_name(unit, free[unit]), self.owner):
                return self._start_copy(unit, free[unit])
        unwatched = [u for u in free if u not in self.watch_claims]
        for unit in sorted(unwatched, key=lambda u: len(self._copies(u)))[:3]:
            due, finish = self._copy_due(unit, now)
            if due <= now:
                if fsops.create_exclusive(self.folder / claim_name(unit, free[unit]), self.owner):
                    return self._start_copy(unit, free[unit])
                continue  # another idle replica claimed it meanwhile
            if fsops.create_exclusive(self.folder / watch_name(unit, finish), self.owner):
                # the holder is expected to commit first: a copy would be discarded. On watch instead: the copy
                # starts if the holder falls behind or goes silent
                self.held[unit] = -1
                self.watching[unit] = due
                self.watch_claims[unit] = int(finish)
                self.watches += 1
                self.idle_looks = 0
                self.next_look, self.watch_look = self._watch_until(), True
                return WAIT
        return None

    def _start_copy(self, unit: int, copy: int) -> Claim:
        self.watching.pop(unit, None)
        self.held[unit] = copy
        self.backup_copies += 1
        self.idle_looks = 0
        return Claim(unit, copy)

    COMMIT_POLL_S = 1.0  # once a watched unit's holder is expected to have committed, whether it did: a stat this
    # often at least (a tenth of this replica's time a unit, when longer)

    def _watch_until(self) -> float:
        """When to look again: when the first unit on watch is due to be copied, or, from when its holder is
        expected to commit it, every COMMIT_POLL_S (one stat: a watcher whose unit is committed looks for work
        or ends at once, not at the copy's due time); with none on watch, at the next ask (this replica looks
        again when one of its own commits)."""
        due = min(self.watching.values(), default=float("-inf"))
        if not self.watching:
            return due
        expected = min(self.watch_claims.get(unit, due) for unit in self.watching)
        every = max(self.COMMIT_POLL_S, (self._pace() or 0.0) / 10)  # a tenth of its time a unit, at most, idle
        return min(due, max(expected, self.clock() + every))

    def _watched(self, now: float) -> Claim | None:
        """A unit on watch whose holder fell behind or went silent: its copy starts now (one open for the
        holder's record; before a copy starts, the claim is read again and the unit's result looked for)."""
        for unit, due in sorted(self.watching.items()):
            if due > now:
                continue
            due, _ = self._copy_due(unit, now)
            if due <= now:
                before = self.holders.get((unit, 0))
                if self._read_holder(unit, 0) != before:  # taken over since: the new holder's record tells
                    due, _ = self._copy_due(unit, now)
            if due > now:
                self.watching[unit] = due
                continue
            del self.watching[unit]
            if unit in self.retry or not self.sink.is_done(unit):  # not committed since the last look
                for copy in range(1, self.backups + 1):  # a copy slot free (another replica may copy it already)
                    if copy not in self._copies(unit) and \
                            fsops.create_exclusive(self.folder / claim_name(unit, copy), self.owner):
                        return self._start_copy(unit, copy)
            self.held.pop(unit, None)  # committed, or running with all its copies: no longer this replica's
            self.finished.add(unit)
        return None

    def _pace(self) -> float | None:
        """This replica's seconds per unit so far (None before its first unit is done)."""
        if not self.units_done or self.first_claim_at is None:
            return None
        return max(0.0, self.last_done_at - self.first_claim_at) / self.units_done

    def _copy_due(self, unit: int, now: float) -> tuple[float, float]:
        """From when a backup copy of a unit held by another is worth running: now when it is expected to commit
        before the holder (by BEAT_BY of its own time), or when the holder is late or silent; otherwise the time
        at which the holder will be late (LATE times its pace after its last commit) or silent for half a lease.

        The holder's pace is in its progress record (units committed, [first request, last commit] of each segment
        of its job, written after commits: one open, which also gives the file's time, its last heartbeat); this
        replica's own is measured here. With neither known, a copy starts at once, as it always did. Returns that
        time, and when the holder is expected to commit."""
        holder = self.holders.get((unit, 0))
        if holder is None:
            holder = self._read_holder(unit, 0)
        if not holder or holder == self.owner:
            return now, now
        if holder not in self.seen:
            self.seen[holder] = self._read_pace(holder)
        pace, since, beat = self.seen[holder]
        mine = self._pace()
        if pace is None:  # nothing committed yet: as fast as this replica, on this unit since its claim
            pace, since = mine, fsops.mtime(self.folder / claim_name(unit))
        if pace is None or since is None:
            return now, now
        copy_s = mine if mine is not None else pace
        if since + pace - now > copy_s * (1 + self.BEAT_BY):
            return now, since + pace  # a straggler: the copy commits first
        due = since + self.LATE * max(pace, copy_s)
        if beat is not None:  # a live holder beats every lease / 4: two beats missed, and it may be dead
            due = min(due, beat + self.lease_s / 2)
        return max(due, now), since + pace

    def _read_pace(self, holder: str) -> tuple[float | None, float | None, float | None]:
        """A holder's seconds per unit and when it last committed (None, None before its first commit), and its
        last heartbeat (None without a progress file), from its progress file: one open."""
        try:
            with fsops.open_file(self.paths.progress / f"{holder}.json", "r") as fh:
                beat = os.fstat(fh.fileno()).st_mtime
                record = json.loads(fh.read())
        except (OSError, ValueError):
            return None, None, None
        if not isinstance(record, dict):
            return None, None, beat
        try:
            segments = [(float(a), float(b)) for a, b in record.get("segments") or []]
            units = int(record.get("units") or 0)
        except (TypeError, ValueError):
            return None, None, beat
        if units <= 0 or not segments:
            return None, None, beat
        busy = sum(max(0.0, b - a) for a, b in segments)
        return busy / units, segments[-1][1], beat

    def _take_over(self, unit: int, copy: int, now: float) -> bool:
        path = self.folder / claim_name(unit, copy)
        cached = self.holders.get((unit, copy))
        holder = cached if cached is not None else self._read_holder(unit, copy)
        if not self._stale(holder, unit, path, now):
            return False
        if cached is not None:  # read before: it may have been taken over since; read it again before taking
            holder = self._read_holder(unit, copy)
            if not self._stale(holder, unit, path, now):
                return False
        tmp = self.folder / f".{claim_name(unit, copy)}.{self.owner}.{self.rng.getrandbits(48):012x}"
        with fsops.open_file(tmp, "w") as fh:
            fh.write(self.owner)
        fsops.replace(tmp, path)
        self.holders[(unit, copy)] = self.owner
        return True

    def _read_holder(self, unit: int, copy: int) -> str:
        holder = self.holders[(unit, copy)] = fsops.read_text(self.folder / claim_name(unit, copy)) or ""
        return holder

    def _stale(self, holder: str, unit: int, path, now: float) -> bool:
        if not holder:
            return False
        if holder == self.owner:
            return unit not in self.held  # claimed by this replica's previous job, before a requeue
        last = self.seen[holder][2] if holder in self.seen else fsops.mtime(self.paths.progress / f"{holder}.json")
        if last is None:
            last = fsops.mtime(path)
        return last is not None and now - last >= self.lease_s

    def lost(self, committed: Callable[[int], bool]) -> list[int]:
        """Held units committed meanwhile by another copy (checked only once no unit is free: one stat each);
        they are released, and their work can be dropped."""
        if not self.in_tail:
            return []
        with self.lock:
            held = [u for u in self.held if u not in self.retry]
        gone = [u for u in held if committed(u)]
        for unit in gone:
            self.release(unit)
        return gone


def result_exists(paths: RunPaths) -> Callable[[int], bool]:
    """Whether a unit is committed (one stat), in the run's output.format."""
    return sink_for(paths).is_done

