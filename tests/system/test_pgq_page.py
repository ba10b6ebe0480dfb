"""The PgQ page (airflow_provider_pgq/ui) in the real deployment: its API behind Airflow's
auth manager, and the page in a real browser (Debian's chromium driven by Playwright).

Runs after test_deployment.py on the same deployment (file order), so every example
mover has run at least once; each test here moves a known count first and compares
what the page shows with the databases.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ROOT, Server, produce, simple_events, tick
from tests.system.conftest import HIDDEN_DAG, PARTITION_DAG, STUCK_SECONDS, TEMPLATED_DAG, System

pytestmark = pytest.mark.system

CHROMIUM = os.environ.get("PGQ_TEST_CHROMIUM", "/usr/bin/chromium")
#: Where the browser test leaves its screenshot.
OUTPUT = Path(os.environ.get("PGQ_TEST_OUTPUT", ROOT / "test-output"))


def _movers(system: System, user: str | None, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {system.airflow.token(user)}"} if user else {}
    return httpx.get(f"{system.airflow.base}/pgq/api/movers", headers=headers, params=params, timeout=60)


def _rows(system: System, user: str = "admin") -> dict[str, dict[str, Any]]:
    r = _movers(system, user)
    assert r.status_code == 200, r.text
    return {m["key"]: m for m in r.json()["movers"]}


def _truth(src: Server, dst: Server, queue: str, consumer: str, subconsumer: str = "") -> dict[str, Any]:
    last_tick, batch = src.execute("select last_tick, current_batch from pgq.get_consumer_info(%s, %s)",
                                   (queue, consumer))[0]
    newest = src.execute("select max(t.tick_id) from pgq.tick t join pgq.queue q on q.queue_id = t.tick_queue"
                         " where q.queue_name = %s", (queue,))[0][0]
    mark = dst.execute("select pgq_ext.get_last_tick(%s, %s)", (consumer, subconsumer))[0][0]
    return {"last_tick": last_tick, "current_batch": batch, "newest_tick": newest, "target_mark": mark}


def _move_known_count(system: System, events: int = 60, ticks: int = 3) -> str:
    """Produce ``events`` in ``ticks`` ticks on queue dr, run pgq_sys_drain, return its run id."""
    for i in range(ticks):
        produce(system.src, "dr", simple_events(events // ticks, prefix=f"page{i}"))
        tick(system.src, "dr")
    af = system.airflow
    af.unpause("pgq_sys_drain")
    run_id = af.trigger("pgq_sys_drain")
    assert af.wait_run("pgq_sys_drain", run_id) == "success"
    assert af.xcom("pgq_sys_drain", run_id, "move")["events"] == events
    return run_id


def test_every_endpoint_needs_an_authenticated_user(system: System) -> None:
    base = system.airflow.base
    for path in ("/pgq/", "/pgq/api/movers", "/pgq/static/pgq.js"):
        assert httpx.get(base + path, timeout=30).status_code == 401, path
        forged = httpx.get(base + path, headers={"Authorization": "Bearer not-a-token"}, timeout=30)
        assert forged.status_code in (401, 403), path
    assert httpx.get(base + "/pgq/static/pgq.js", timeout=30,
                     headers={"Authorization": f"Bearer {system.airflow.token('viewer')}"}).status_code == 200


def test_the_movers_with_live_positions_and_the_last_runs(system: System) -> None:
    run_id = _move_known_count(system)
    rows = _rows(system)
    drain = rows["pgq_sys_drain.move"]
    assert drain["state"] == "keeping up" and drain["errors"] == []
    truth = _truth(system.src, system.dst, "dr", "dr_mover")
    for field, value in truth.items():
        assert drain[field] == value, (field, drain, truth)
    assert drain["marks_agree"] is True and drain["registered"] is True
    assert drain["source"] == {"conn_id": "pgq_sys_src", "queue": "dr", "host": "127.0.0.1",
                               "port": str(system.src.cluster.port), "database": system.src.dbname}
    last = drain["runs"][-1]
    assert (last["run_id"], last["state"], last["events"], last["batches"]) == (run_id, "success", 60, 3)
    assert drain["grid_url"].endswith("/dags/pgq_sys_drain")
    # every example mover has a row: the DAG file's movers and the mapped partitions
    assert {"pgq_sys_backfill.move", "pgq_sys_sensor.move", f"{HIDDEN_DAG}.move"} <= set(rows)
    assert {f"{PARTITION_DAG}.move_partition[{i}]" for i in range(3)} <= set(rows)


def test_a_reachable_and_an_unreachable_mover_in_one_response(system: System) -> None:
    af = system.airflow
    af.unpause(PARTITION_DAG)
    # pgq_part_down cannot be reached: the run fails, the other partitions move
    assert af.wait_run(PARTITION_DAG, af.trigger(PARTITION_DAG)) == "failed"
    rows = _rows(system)
    up = rows[f"{PARTITION_DAG}.move_partition[0]"]
    down = rows[f"{PARTITION_DAG}.move_partition[2]"]
    assert up["errors"] == [] and up["last_tick"] is not None
    assert up["target_mark"] == _truth(system.parts[0], system.central, "events", "consolidate_events",
                                       "pgq_part_0")["target_mark"]
    assert down["state"] == "stopped" and down["last_tick"] is None
    assert any("source database" in e for e in down["errors"]), down["errors"]
    assert down["source"] == {"conn_id": "pgq_part_down", "queue": "events", "host": "127.0.0.1",
                              "port": "1", "database": "none"}


def test_a_templated_mover_is_read_as_its_last_run_rendered_it(system: System) -> None:
    af = system.airflow
    before = _rows(system)["pgq_sys_templated.move"]
    assert before["state"] == "unknown" and before["source"]["queue"] == "{{ params.queue }}"
    assert before["last_tick"] is None and "templated" in " ".join(before["errors"])
    produce(system.src, "tq", simple_events(12, prefix="tq"))
    af.unpause("pgq_sys_templated")
    run_id = af.trigger("pgq_sys_templated")  # registers tq_mover: the first run moves nothing
    assert af.wait_run("pgq_sys_templated", run_id) == "success"
    tick(system.src, "tq")
    after = _rows(system)["pgq_sys_templated.move"]
    assert after["rendered_from"] == run_id and after["source"]["queue"] == "tq" and after["errors"] == []
    truth = _truth(system.src, system.dst, "tq", "tq_mover")
    assert (after["last_tick"], after["newest_tick"]) == (truth["last_tick"], truth["newest_tick"])
    assert after["newest_tick"] > after["last_tick"] and after["state"] == "keeping up"


def test_values_a_run_rendered_are_shown_only_to_users_who_may_read_its_task_instances(
    system: System,
) -> None:
    """What a run rendered (run-time queues, connection ids) is task-instance data: the
    page showed it to every user who may read the DAG."""
    af = system.airflow
    admin = _rows(system, "admin")[f"{TEMPLATED_DAG}.move"]
    if admin["rendered_from"] is None:  # no run yet
        af.unpause(TEMPLATED_DAG)
        assert af.wait_run(TEMPLATED_DAG, af.trigger(TEMPLATED_DAG)) == "success"
        admin = _rows(system, "admin")[f"{TEMPLATED_DAG}.move"]
    assert admin["rendered_from"] is not None and admin["source"]["queue"] == "tq"
    outsider = _rows(system, "outsider")[f"{TEMPLATED_DAG}.move"]
    assert outsider["rendered_from"] is None, outsider
    assert outsider["source"]["queue"] == "{{ params.queue }}" and outsider["runs"] is None


def test_no_password_ever(system: System) -> None:
    text = _movers(system, "admin").text
    assert "nopass" not in text  # pgq_part_down's password, refused by nobody at port 1
    assert not system.src.cluster.password or system.src.cluster.password not in text
    assert "nobody" not in text  # not even the login


def test_a_user_sees_only_the_movers_of_dags_they_may_read(system: System) -> None:
    admin = _rows(system, "admin")
    outsider = _rows(system, "outsider")
    assert f"{HIDDEN_DAG}.move" in admin
    assert f"{HIDDEN_DAG}.move" not in outsider
    assert set(admin) - set(outsider) == {f"{HIDDEN_DAG}.move"}


def test_a_user_who_may_not_read_the_connections_sees_neither_their_databases_nor_positions(
    system: System,
) -> None:
    """The page opened every connection a readable DAG names, with that connection's
    credentials, and showed host, port, database and positions to users the auth manager
    does not let read connections (a viewer, under the simple auth manager)."""
    _move_known_count(system, events=6, ticks=1)
    admin = _rows(system, "admin")["pgq_sys_drain.move"]
    viewer = _rows(system, "viewer")["pgq_sys_drain.move"]
    assert admin["source"]["database"] == system.src.dbname and admin["last_tick"] is not None
    assert viewer["source"] == {"conn_id": "pgq_sys_src", "queue": "dr"}, viewer["source"]
    assert set(viewer["target"]) == {"conn_id", "queue"}, viewer["target"]
    assert (viewer["last_tick"], viewer["target_mark"], viewer["pending_events"]) == (None, None, None)
    assert any("may not read this connection" in e for e in viewer["errors"]), viewer["errors"]
    shown = {k: v for side in ("source", "target") for k, v in viewer[side].items() if k != "conn_id"}
    assert set(shown) == {"queue"} and str(system.src.cluster.port) not in repr(viewer)
    operator = _rows(system, "operator")["pgq_sys_drain.move"]  # may read connections
    assert operator["source"]["database"] == system.src.dbname and operator["last_tick"] is not None


def test_each_mover_task_instance_links_to_its_row(system: System) -> None:
    af = system.airflow
    run_id = af.runs("pgq_sys_drain")[-1]["dag_run_id"]
    links = af.api("GET", f"/dags/pgq_sys_drain/dagRuns/{run_id}/taskInstances/move/links")
    assert links["extra_links"]["PgQ movers"] == f"{af.base}/pgq/?mover=pgq_sys_drain.move#pgq_sys_drain.move"


def _playwright() -> Any:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: scripts/setup-env installs Debian's chromium package")
    return playwright


def _logged_in_page(browser: Any, system: System) -> Any:
    """A page logged in through Airflow's own login form, as "operator" (who may read the
    connections, so the rows show positions)."""
    af = system.airflow
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(f"{af.base}/auth/login")
    page.get_by_label("Username").fill("operator")
    page.get_by_label("Password").fill(af.passwords["operator"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url, timeout=30_000)
    return page


def test_the_page_in_a_real_browser(system: System) -> None:
    playwright = _playwright()
    run_id = _move_known_count(system, events=90)
    truth = _truth(system.src, system.dst, "dr", "dr_mover")
    af = system.airflow
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = OUTPUT / "pgq-page.png"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = _logged_in_page(browser, system)
            # the "PgQ" entry of the navigation shows the page in a frame
            page.goto(f"{af.base}/plugin/pgq")
            frame = page.frame_locator("iframe")
            row = frame.locator('tr[data-key="pgq_sys_drain.move"]')
            row.wait_for(timeout=60_000)
            shown = {cls: row.locator(f"td.{cls}").inner_text() for cls in
                     ("last-tick", "newest-tick", "target-mark", "marks-agree", "last-run")}
            state = row.get_attribute("data-state")
            page.screenshot(path=str(shot), full_page=True)
            # the row's DAG link leads the UI (not the frame) to the DAG's grid
            row.locator("a.grid-link").click()
            page.wait_for_url("**/dags/pgq_sys_drain", timeout=30_000)
            # the page alone, full length (the frame above is cut at the window's height)
            page.goto(f"{af.base}/pgq/?mover=pgq_sys_drain.move")
            page.locator("body[data-loaded=true]").wait_for(timeout=60_000)
            page.screenshot(path=str(OUTPUT / "pgq-page-full.png"), full_page=True)
        finally:
            browser.close()
    summary = f"PgQ page screenshot: {shot}\nshown: {shown} state={state}\ndatabase: {truth} run {run_id}\n"
    (OUTPUT / "pgq-page.txt").write_text(summary)
    print("\n" + summary)
    assert shown["last-tick"] == str(truth["last_tick"])
    assert shown["newest-tick"] == str(truth["newest_tick"])
    assert shown["target-mark"] == str(truth["target_mark"])
    assert shown["marks-agree"] == "yes"
    assert shown["last-run"] == "success: 90 events, 3 batches"
    assert state == "keeping up"
    assert shot.stat().st_size > 10_000


def test_a_batch_left_open_by_a_dead_worker_shows_stuck(system: System) -> None:
    """Issue 24, point 3: a mover whose worker died holding a batch showed green ("keeping
    up") until the lag passed ui_behind_seconds. The worker here is the test: it takes the
    batch as the mover would and never finishes it."""
    playwright = _playwright()
    af = system.airflow
    produce(system.src, "dr", simple_events(30, prefix="stuck"))
    tick(system.src, "dr")
    [[batch_id]] = system.src.execute("select pgq.next_batch('dr', 'dr_mover')")
    assert batch_id is not None
    time.sleep(STUCK_SECONDS + 1)
    row = _rows(system)["pgq_sys_drain.move"]
    assert row["current_batch"] == batch_id and row["last_seen_seconds"] > STUCK_SECONDS, row
    assert row["state"] == "stuck" and row["lag_seconds"] < 900, row  # not yet "falling behind"
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = OUTPUT / "pgq-page-stuck.png"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = _logged_in_page(browser, system)
            page.goto(f"{af.base}/pgq/?mover=pgq_sys_drain.move")
            page.locator("body[data-loaded=true]").wait_for(timeout=60_000)
            shown = page.locator('tr[data-key="pgq_sys_drain.move"]')
            state = shown.get_attribute("data-state")
            badge = shown.locator("td.state .badge").inner_text()
            open_for = shown.locator("td.current-batch").inner_text()
            rule = page.locator("#rule-list").inner_text()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert state == badge == "stuck"
    assert open_for.startswith(f"{batch_id}\nopen ") and open_for.endswith(" s"), open_for
    assert f"has not moved for more than {STUCK_SECONDS} s" in rule and "up_for_retry" in rule
    assert shot.stat().st_size > 10_000
    # the next run takes the open batch over and moves it once: green again
    af.unpause("pgq_sys_drain")
    run_id = af.trigger("pgq_sys_drain")
    assert af.wait_run("pgq_sys_drain", run_id) == "success"
    assert af.xcom("pgq_sys_drain", run_id, "move")["events"] == 30
    after = _rows(system)["pgq_sys_drain.move"]
    assert after["state"] == "keeping up" and after["current_batch"] is None, after
