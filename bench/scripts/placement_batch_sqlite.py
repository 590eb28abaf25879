#!/usr/bin/env python3
"""What a placement batch's statements cost SQLite, by the pending_logons table's layout.

Replays the statements one placement batch runs on SQLite (BEGIN IMMEDIATE, the farm's counter,
the users' pending logons and sessions, the upsert of the new pending logons, COMMIT; as in
broker/src/store/sql.rs and placement.rs) on a file built from the broker's own migrations with
1,000 machines, 100,000 sessions and PENDING pending logons, WAL with synchronous=NORMAL and
manual checkpoints as the broker runs them; then the refresh of a placement's copy of the farm
(200 of the 1,000 machines changed) as that layout would have to run it. Each layout is timed in
the same run, in rounds that alternate, and printed as one line: microseconds per batch and per
statement, milliseconds per refresh. The numbers include Python's own cost per call (the same
for every layout); compare layouts, not absolute values.

    python3 bench/scripts/placement_batch_sqlite.py [--pending 30000] [--batches 2000] [--rounds 2]
"""

import argparse
import os
import random
import sqlite3
import tempfile
import time
import uuid

MIGRATIONS = os.path.join(os.path.dirname(__file__), "..", "..", "broker", "migrations", "sqlite")

LAYOUTS = {
    # Migrations as they are: the rowid table, its primary key, by expiry, by machine.
    "as migrated": "",
    # The same indexes on a table stored in its primary key.
    "WITHOUT ROWID": """
        CREATE TABLE p2 (farm TEXT NOT NULL REFERENCES farms (name), user_key TEXT NOT NULL,
            machine_id BLOB NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
            created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
            PRIMARY KEY (farm, user_key)) WITHOUT ROWID;
        INSERT INTO p2 SELECT farm, user_key, machine_id, created_at, expires_at FROM pending_logons;
        DROP TABLE pending_logons;
        ALTER TABLE p2 RENAME TO pending_logons;
        CREATE INDEX pending_logons_by_expiry ON pending_logons (farm, expires_at);
        CREATE INDEX pending_logons_by_machine ON pending_logons (machine_id);""",
    # No index by machine; the expiry index carries the machine, so that counts per machine
    # read it alone (the farm's logons in flight, grouped).
    "no by_machine, expiry carries machine": """
        DROP INDEX pending_logons_by_machine;
        DROP INDEX pending_logons_by_expiry;
        CREATE INDEX pending_logons_in_flight ON pending_logons (farm, expires_at, machine_id);""",
    # No secondary index at all: the floor.
    "primary key only": """
        DROP INDEX pending_logons_by_machine;
        DROP INDEX pending_logons_by_expiry;""",
}

# A placement's refresh of its copy of the farm: the machines whose row changed, with their
# unexpired pending logons; per machine by the index by machine where there is one
# (sql.rs SELECT_CHANGED_MACHINES), else in one grouped pass over the farm's logons in flight.
REFRESH_BY_MACHINE = ("SELECT m.id, (SELECT count(*) FROM pending_logons p "
                      "WHERE p.machine_id = m.id AND p.expires_at > ?1) FROM machines m "
                      "WHERE m.farm = ?2 AND m.updated_at >= ?3")
REFRESH_GROUPED = ("SELECT m.id, COALESCE(p.pending, 0) FROM machines m LEFT JOIN "
                   "(SELECT machine_id, count(*) AS pending FROM pending_logons "
                   "WHERE farm = ?2 AND expires_at > ?1 GROUP BY machine_id) p "
                   "ON p.machine_id = m.id WHERE m.farm = ?2 AND m.updated_at >= ?3")

STEPS = ["begin", "lock", "lookup", "upsert", "commit"]


def build(path, layout, pending, now):
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=wal", "synchronous=normal", "foreign_keys=on",
                   "wal_autocheckpoint=0"):
        db.execute(f"PRAGMA {pragma}")
    for name in sorted(os.listdir(MIGRATIONS)):
        with open(os.path.join(MIGRATIONS, name)) as migration:
            db.executescript(migration.read())
    rng = random.Random(7)
    db.execute("INSERT INTO farms (name, created_at) VALUES ('bench', ?)", (now,))
    machines = [uuid.UUID(int=rng.getrandbits(128)).bytes for _ in range(1000)]
    db.execute("BEGIN")
    for index, machine in enumerate(machines):
        db.execute(
            "INSERT INTO machines (id, farm, name, name_key, address, agent_weight, "
            "agent_session_limit, single_session, agent_version, state, last_seen_at, "
            "created_at, updated_at) VALUES (?, 'bench', ?, ?, '10.0.0.1:3389', 1, 1000, 0, "
            "'1', 'ready', ?, ?, ?)",
            (machine, f"ts{index}", f"ts{index}", now, now, now))
    for session in range(100_000):
        db.execute("INSERT INTO sessions VALUES (?, ?, 'bench', ?, ?, 'D', 'active', '', ?, ?)",
                   (machines[session % 1000], session, f"user{session}", f"user{session}",
                    now, now))
    for row in range(pending):
        db.execute("INSERT INTO pending_logons VALUES ('bench', ?, ?, ?, ?)",
                   (f"new{rng.getrandbits(48)}", rng.choice(machines), now, now + 30_000 + row))
    db.execute("COMMIT")
    db.executescript(layout)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db, machines


def lookup_statement(keys):
    rows = ", ".join(f"(?{3 + at})" for at in range(keys))
    listed = ", ".join(f"?{3 + at}" for at in range(keys))
    return ("SELECT user_key, machine_id FROM (SELECT k.column1 AS user_key, "
            "(SELECT p.machine_id FROM pending_logons p WHERE p.farm = ?1 "
            "AND p.user_key = k.column1 AND p.expires_at > ?2) AS machine_id "
            f"FROM (VALUES {rows}) AS k) AS found WHERE machine_id IS NOT NULL "
            "UNION ALL SELECT DISTINCT user_key, CAST(NULL AS uuid) FROM sessions "
            f"WHERE farm = ?1 AND user_key IN ({listed})")


def upsert_statement(rows):
    values = ", ".join(f"(?1, ?{4 + 2 * row}, ?{5 + 2 * row}, ?2, ?3)" for row in range(rows))
    return ("INSERT INTO pending_logons (farm, user_key, machine_id, created_at, expires_at) "
            f"VALUES {values} ON CONFLICT (farm, user_key) DO UPDATE SET "
            "machine_id = excluded.machine_id, created_at = excluded.created_at, "
            "expires_at = excluded.expires_at")


def batch(db, machines, rng, size=7):
    now = int(time.time() * 1000)
    users = sorted(f"new{rng.getrandbits(48)}" for _ in range(size))
    keys = users + [users[-1]] * (8 - size)
    marks = [time.perf_counter()]
    db.execute("BEGIN IMMEDIATE")
    marks.append(time.perf_counter())
    db.execute("UPDATE farms SET placements = placements + 1 WHERE name = 'bench' "
               "RETURNING policy, placements").fetchall()
    marks.append(time.perf_counter())
    db.execute(lookup_statement(len(keys)), ["bench", now] + keys).fetchall()
    marks.append(time.perf_counter())
    arguments = ["bench", now, now + 30_000]
    for user in users:
        arguments += [user, rng.choice(machines)]
    db.execute(upsert_statement(size), arguments)
    marks.append(time.perf_counter())
    db.execute("COMMIT")
    marks.append(time.perf_counter())
    return [after - before for before, after in zip(marks, marks[1:])]


def measure(path, layout, options):
    now = int(time.time() * 1000)
    db, machines = build(path, layout, options.pending, now)
    rng = random.Random(11)
    for _ in range(200):
        batch(db, machines, rng)
    totals = [0.0] * len(STEPS)
    started = time.perf_counter()
    for index in range(options.batches):
        for step, seconds in enumerate(batch(db, machines, rng)):
            totals[step] += seconds
        if index % 250 == 249:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    elapsed = time.perf_counter() - started
    # A fifth of the machines reported a load since the last refresh.
    now = int(time.time() * 1000)
    db.execute("UPDATE machines SET updated_at = ? WHERE rowid % 5 = 0", (now,))
    has_by_machine = db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'index' "
                                "AND name = 'pending_logons_by_machine'").fetchone()[0]
    refresh = REFRESH_BY_MACHINE if has_by_machine else REFRESH_GROUPED
    refresh_started = time.perf_counter()
    for _ in range(20):
        db.execute(refresh, (now, "bench", now)).fetchall()
    refresh_ms = 1e3 * (time.perf_counter() - refresh_started) / 20
    in_flight = db.execute("SELECT count(*) FROM pending_logons").fetchone()[0]
    db.close()
    per_step = " ".join(f"{name}_us={1e6 * total / options.batches:.0f}"
                        for name, total in zip(STEPS, totals))
    return (f"batch_us={1e6 * elapsed / options.batches:.0f} {per_step} "
            f"refresh_200_of_1000_ms={refresh_ms:.2f} pending_at_refresh={in_flight}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pending", type=int, default=30_000)
    parser.add_argument("--batches", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    print(f"sqlite={sqlite3.sqlite_version} pending={options.pending} "
          f"batches={options.batches} placements_per_batch=7")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "placement.sqlite")
        for round_ in range(1, options.rounds + 1):
            for name, layout in LAYOUTS.items():
                print(f"round={round_} layout={name!r} {measure(path, layout, options)}",
                      flush=True)


if __name__ == "__main__":
    main()
