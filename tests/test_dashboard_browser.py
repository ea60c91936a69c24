"""The dashboard tells the story: ``search dashboard`` in headless Chromium on a finished study.

A tiny study is run by the real runner (``run_study``) with a fake objective (below) that
reports per-epoch nDCG@10, so the median pruner prunes some trials, and runs out of memory in
``backward`` for batch 256, so a real OOM is recorded and the frontier then skips what it
dominates. ``search report --publish`` saves the study note and uploads the plots;
``search dashboard`` serves it on a free port, and Debian's Chromium (driven by Playwright,
never ``playwright install``) checks the rendered page: the metric name, the trial count, an
OOM trial's note, and the study note's per-model table. Screenshots are kept under
``$SEARCH_TEST_ARTIFACTS`` (else the test's tmp directory) and their paths printed.

Under ``CI=true`` a missing Chromium or Playwright fails (marker ``browser``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from _factories import ci
from _factories import kept_files_dir

from search.observe.subscribers import standard_subscribers
from search.record import attrs
from search.record.counts import is_skip
from search.spec.load import load_spec
from search.spec.options import RunOptions
from search.worker.runner import run_study

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search" / "studies" / "data" / "ko-demo"
CHROMIUM = os.environ.get("SEARCH_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HERE = "test_dashboard_browser"  # the trial child imports fake_train by this module name
OOM_BATCH = 256
N_TRIALS = 14

pytestmark = [
    pytest.mark.train,  # the real runner and trial processes (a fake objective: ~20 s)
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
]


def fake_train(cfg: Any, *, report: Any = None, on_phase: Any = None) -> dict[str, Any]:
    """Three epochs of a score set by lr; batch 256 runs out of memory in backward."""
    import torch

    if on_phase is not None:
        on_phase("forward")
    if cfg.batch_size >= OOM_BATCH:
        if on_phase is not None:
            on_phase("backward")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    base = 0.2 + 1000 * cfg.lr + (0.1 if cfg.model == "multilingual-minilm" else 0.0)
    metrics: dict[str, float] = {}
    for epoch in range(3):
        metrics = {"ndcg@10": base + 0.02 * epoch, "mrr@10": base, "recall@10": base + 0.1}
        if report is not None and report(epoch, metrics):
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")
    return {"metrics": metrics, "peak_memory_mb": 300.0 + cfg.batch_size}


def _spec(tmp: Path) -> Path:
    path = tmp / "dash.yaml"
    path.write_text(
        f"""study: {{name: dash, direction: maximize, metric: ndcg@10, n_trials: {N_TRIALS}}}
models:
  ko-simcse: {{}}
  multilingual-minilm: {{}}
space:
  batch_size: [32, 64, {OOM_BATCH}]
  max_len: [128]
  lr: {{low: 1.0e-5, high: 2.0e-4, log: true}}
  temperature: {{low: 0.01, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.2}}
  weight_decay: {{low: 0.0, high: 0.1}}
training: {{epochs: 3, amp: false, gradient_checkpointing: false, hard_negatives: 1,
           seed: 0, max_train_samples: 16}}
data: {{train: {DEMO / "train.jsonl"}, eval: {DEMO}, split: test}}
sampler: {{type: random, seed: 3}}
pruner: {{type: median, n_startup_trials: 2, n_warmup_steps: 0}}
""",
        encoding="utf-8",
    )
    return path


def _search(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished study with complete, median-pruned and OOM trials, notes and plots."""
    tmp = tmp_path_factory.mktemp("dash")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    url = f"sqlite:///{tmp}/search.db"
    spec = load_spec(_spec(tmp))
    opts = RunOptions(
        storage_url=url,
        device="cpu",
        use_estimate=False,  # the fake objective's OOMs are the real ones
        objective=f"{HERE}:fake_train",
        study_name="dash",
        worker="dash-test",
    )
    summary = run_study(spec, opts, subscribers=standard_subscribers(spec, opts))  # notes
    published = _search("report", "--study", "dash", "--storage", url, "--publish", cwd=tmp)
    return {"tmp": tmp, "url": url, "study": summary.study, "published": published}


def test_the_runner_writes_a_note_per_trial_and_the_study_note(finished: dict[str, Any]) -> None:
    from optuna_dashboard import get_note

    study: optuna.Study = finished["study"]
    trials = study.get_trials()
    trained = [t for t in trials if not is_skip(t)]  # skips are recorded but spend no budget
    assert len(trained) == N_TRIALS
    outcomes = {t.user_attrs.get(attrs.OUTCOME) for t in trials}
    assert {"complete", "pruned", "oom"} <= outcomes, outcomes
    kinds = {t.user_attrs.get(attrs.OOM_KIND) for t in trials if t.user_attrs.get(attrs.OOM)}
    assert "real" in kinds
    system = study._storage.get_study_system_attrs(study._study_id)
    for t in trials:
        prefix = f"dashboard:{t._trial_id}:note_str:"
        note = "".join(str(v) for k, v in sorted(system.items()) if k.startswith(prefix))
        assert note, f"trial {t.number} has no note"
        outcome = t.user_attrs[attrs.OUTCOME]
        if outcome == "oom" and t.user_attrs[attrs.OOM_KIND] == "real":
            assert note.startswith("OOM (real) in backward at "), note
            assert f"b{OOM_BATCH} len128" in note
        elif outcome == "pruned":
            assert note.startswith("pruned by the median rule at "), note
            assert " examples seen — ndcg@10 " in note, note
        elif outcome == "complete":
            assert note.startswith("complete — ndcg@10 "), note
    study_note = get_note(study)
    assert "| model | trials | complete | pruned |" in study_note
    assert "| ko-simcse |" in study_note and "| multilingual-minilm |" in study_note
    skipped = len(trials) - N_TRIALS
    skips = f" (+{skipped} skipped for memory, free)" if skipped else ""
    assert f"{N_TRIALS} trials trained of a budget of {N_TRIALS}{skips}" in study_note


# ------------------------------------------------------------------ the browser


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def dashboard(finished: dict[str, Any]) -> Iterator[str]:
    """``search dashboard`` on the finished study, as a subprocess on a free port."""
    import urllib.request

    port = _free_port()
    log = finished["tmp"] / "dashboard.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "search.cli",
                "dashboard",
                "--storage",
                finished["url"],
                "--port",
                str(port),
            ],
            cwd=finished["tmp"],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{base}/api/meta", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert "artifacts in" in log.read_text()  # served with the study's artifact store
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium driven by Playwright; missing it fails under CI."""
    problem = None
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        problem = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = problem or "playwright is not installed (pip install -e '.[test]')"
    if problem:
        (pytest.fail if ci() else pytest.skip)(problem)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots are kept: ``$SEARCH_TEST_ARTIFACTS/dashboard`` or a tmp dir."""
    return kept_files_dir(tmp_path_factory, "dashboard")


def _open(browser: Any, url: str, wait_for: str) -> Any:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    try:
        page.get_by_text(wait_for).first.wait_for(timeout=30_000)
    except Exception:
        raise AssertionError(f"{url}: {wait_for!r} never rendered ({errors})") from None
    return page


def table_rows(table: Any) -> list[list[str]]:
    """The cells of a rendered table's body rows."""
    return [r.locator("td").all_inner_texts() for r in table.locator("tbody tr").all()]


def _shot(page: Any, shots: Path, name: str) -> Path:
    path = shots / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


@pytest.mark.browser
def test_the_rendered_dashboard_tells_the_story(
    finished: dict[str, Any], dashboard: str, browser: Any, shots: Path
) -> None:
    study: optuna.Study = finished["study"]
    study_id = study._study_id
    oom = next(t for t in study.get_trials() if t.user_attrs.get(attrs.OOM_KIND) == "real")

    # The study page: the metric names the plots' axis, the plots are the study's artifacts.
    page = _open(browser, f"{dashboard}/dashboard/studies/{study_id}", "Study Artifacts")
    page.locator(".ytitle", has_text="ndcg@10").first.wait_for(timeout=30_000)
    body = page.inner_text("body")
    assert "Objective 0" not in body
    for name in ("overview.png", "oom_grid.png", "plots.html"):
        assert name in body, name
    _shot(page, shots, "study.png")

    # The trial list: the trial count, and the OOM trial's note says why it was "Pruned".
    url = f"{dashboard}/dashboard/studies/{study_id}/trials?numbers={oom.number}"
    page = _open(browser, url, "OOM (real) in backward at ")
    body = page.inner_text("body")
    assert f"{len(study.get_trials())} Trials" in body  # the dashboard counts skips too
    note = next(line for line in body.splitlines() if line.startswith("OOM (real)"))
    # ... its model and config, then the device and precision it ran on
    assert note.endswith(f"ko-simcse b{OOM_BATCH} len128 (cpu, fp32)") or note.endswith(
        f"multilingual-minilm b{OOM_BATCH} len128 (cpu, fp32)"
    ), note
    _shot(page, shots, "oom_trial.png")

    # The study note: the per-model report as a rendered table.
    page = _open(browser, f"{dashboard}/dashboard/studies/{study_id}/note", "Per-model report")
    table = page.locator("table").first
    header = table.locator("th").all_inner_texts()
    assert header[:4] == ["model", "trials", "complete", "pruned"], header
    assert "best ndcg@10" in header
    rows = {r[0] for r in table_rows(table)}
    assert rows == {"ko-simcse", "multilingual-minilm"}, rows
    body = page.inner_text("body")
    best = study.best_trial
    assert f"Best ndcg@10 {best.value:.4f}: trial {best.number}, " in body
    assert "Out of memory" in body  # the OOM configs per model, with kind and phase
    oom_rows = table_rows(page.locator("table").nth(1))
    assert [oom.user_attrs[attrs.MODEL], str(OOM_BATCH), "128", "real", "backward"] in [
        r[:5] for r in oom_rows
    ], oom_rows
    _shot(page, shots, "study_note.png")


# Last: it overwrites two of the published plots.
def test_publish_again_replaces_the_plots(finished: dict[str, Any], tmp_path: Path) -> None:
    from search.observe.artifacts import artifact_store
    from search.observe.publish import study_artifacts
    from search.observe.publish import upload_files

    study: optuna.Study = finished["study"]
    assert "7 plots" in finished["published"].stderr, finished["published"].stderr
    directory = Path(f"{finished['tmp']}/search.db.artifacts")
    before = study_artifacts(study)
    assert {"overview.png", "plots.html"} <= set(before)
    assert sorted(p.name for p in directory.iterdir()) == sorted(before.values())
    # What a second --publish uploads: the same file names, new content.
    again = [tmp_path / name for name in ("overview.png", "plots.html", "new.png")]
    for path in again:
        path.write_bytes(f"v2 {path.name}".encode())
    done = dict(upload_files(study, again, artifact_store(directory)))
    after = study_artifacts(study)
    assert done["overview.png"] == before["overview.png"]  # overwritten in place
    assert (directory / before["plots.html"]).read_bytes() == b"v2 plots.html"
    assert set(after) == set(before) | {"new.png"}
    assert len(list(directory.iterdir())) == len(before) + 1


# ------------------------------------------------------------------ loopback, PostgreSQL


def test_a_public_host_needs_public_and_is_warned_about(finished: dict[str, Any]) -> None:
    url, tmp = finished["url"], finished["tmp"]
    refused = _search("dashboard", "--storage", url, "--host", "0.0.0.0", cwd=tmp, check=False)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--host 0.0.0.0" in lines[0] and "--public" in lines[0], lines
    assert refused.stdout == ""

    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "search.cli",
            "dashboard",
            "--storage",
            url,
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--public",
        ],  # fmt: skip
        cwd=tmp,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None
            time.sleep(0.2)
        else:
            raise AssertionError("the dashboard never listened")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert "warning: the dashboard has no login" in err, err
    assert f"http://0.0.0.0:{port}" in out


def test_publish_on_postgresql_needs_an_artifact_directory(pg_url: str, tmp_path: Path) -> None:
    import uuid

    name = f"publish-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=pg_url)
    study.enqueue_trial({"x": 1})
    env_clean = {k: v for k, v in os.environ.items() if k != "SEARCH_ARTIFACTS"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "search.cli",
            "report",
            "--study",
            name,
            "--storage",
            pg_url,
            "--publish",
        ],  # fmt: skip
        cwd=tmp_path,
        env={**env_clean, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "--artifacts DIR or $SEARCH_ARTIFACTS" in lines[0], lines
        system = study._storage.get_study_system_attrs(study._study_id)
        assert not [k for k in system if k.startswith(("dashboard:", "artifacts:"))]
        assert list(tmp_path.iterdir()) == []
    finally:
        optuna.delete_study(study_name=name, storage=pg_url)


# ------------------------------------------------------------------ the runner's hook


def _told(study: optuna.Study, **user_attrs: Any) -> optuna.trial.FrozenTrial:
    trial = study.ask()
    for key, value in user_attrs.items():
        trial.set_user_attr(key, value)
    return study.tell(trial, 0.5)


def test_the_study_note_is_refreshed_at_most_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optuna_dashboard import get_note

    from search.observe import publish

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/n.db", direction="maximize")
    clock = [1000.0]
    monkeypatch.setattr(publish.time, "monotonic", lambda: clock[0])
    publish.after_trial(study, _told(study, model="m1", outcome="complete"))
    assert "| m1 |" in get_note(study)  # the first trial writes it at once
    clock[0] += publish.STUDY_NOTE_INTERVAL_S / 2
    publish.after_trial(study, _told(study, model="m2", outcome="complete"))
    assert "| m2 |" not in get_note(study)  # too soon: trial note only
    clock[0] += publish.STUDY_NOTE_INTERVAL_S / 2
    publish.after_trial(study, _told(study, model="m3", outcome="complete"))
    assert "| m2 |" in get_note(study) and "| m3 |" in get_note(study)
    publish.after_trial(study, _told(study, model="m4", outcome="complete"))
    publish.finish(study)  # the end of a run writes it whatever the clock says
    assert "| m4 |" in get_note(study)


def test_notes_never_fail_a_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from search.observe import publish

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/n.db")
    frozen = _told(study, model="m")

    def broken(*args: Any) -> str:
        raise OSError("disk full\nsecond line")

    monkeypatch.setattr(publish, "save_trial_note", broken)
    with caplog.at_level("WARNING", logger="search.observe.publish"):
        publish.after_trial(study, frozen)  # logged, not raised
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["dashboard note of trial 0 not written: OSError: disk full second line"]

    # Without optuna-dashboard (an extra) nothing is written and nothing is said above DEBUG.
    caplog.clear()
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)
    with caplog.at_level("DEBUG", logger="search.observe.publish"):
        publish.after_trial(study, frozen)
        publish.finish(study)
    assert {r.levelname for r in caplog.records} <= {"DEBUG"}
    system = study._storage.get_study_system_attrs(study._study_id)
    assert not [k for k in system if k.startswith("dashboard:")]
