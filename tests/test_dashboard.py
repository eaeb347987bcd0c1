"""`poso ui` in a real headless Chromium (Debian's chromium and chromedriver, driven by Selenium)
over a real small pipeline home: ingest, two daily runs (TFX, Beam, TensorFlow) and a failed run.

Selenium gets explicit paths to the browser and the driver, so Selenium Manager (which would
download them) never runs: SE_MANAGER_PATH points at a program that does not exist, and the
Selenium cache folder is checked to stay empty.
"""

import datetime
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from components import impression_logs, synthetic_logs
from feature_specs import specs
from pipeline import config as config_lib
from pipeline import local_runner, report, summary
from pipeline.dashboard import data as data_lib
from pipeline.dashboard import pages
from pipeline.dashboard import server as server_lib

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
START = datetime.date(2022, 4, 8)
RUN_DAYS = [START + datetime.timedelta(days=1), START + datetime.timedelta(days=2)]
MISSING_DAY = START + datetime.timedelta(days=3)   # a log without its columns: its run fails in AvcExampleGen
PAGE_WIDTH = 1280


def _config(root, date):
    return config_lib.RunConfig(date=date, data_dir=str(root / "data"), home=str(root / "home"), train_days=1,
                                min_train_days=1, train_steps=40, beam_direct_running_mode="in_memory",
                                beam_num_workers=1)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Day 1 ingested, days 2 and 3 run (summary and report written as `poso run` does), day 4 failed."""
    root = tmp_path_factory.mktemp("dashboard")
    synthetic_logs.generate(str(root / "data"), START, 3, seed=7, impressions_per_day=500)
    broken = impression_logs.day_dir(str(root / "data"), MISSING_DAY)
    os.makedirs(broken)
    with open(os.path.join(broken, "log.csv"), "w") as f:
        f.write("user_id,video_id\n1,2\n")
    for date in RUN_DAYS:
        result = local_runner.run_day(_config(root, date))
        summary.write_summary(result, str(root / "home"))
        report.write_report(result, str(root / "home"))
    with pytest.raises(local_runner.PipelineRunError):
        local_runner.run_day(_config(root, MISSING_DAY))
    return str(root / "home")


@pytest.fixture(scope="module")
def dashboard(home, tmp_path_factory):
    """`poso ui --home HOME --port 0` (the command bin/poso runs inside the environment); its URL."""
    log_path = tmp_path_factory.mktemp("ui") / "ui.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--home", home, "--port", "0"],
                                   cwd=config_lib.PROJECT_DIR, stdout=subprocess.PIPE, stderr=log, text=True,
                                   env={**os.environ, "PYTHONPATH": config_lib.PROJECT_DIR}, start_new_session=True)
    try:
        line = process.stdout.readline()  # the command prints its URL once it listens
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, f"no URL from `poso ui` (exit {process.poll()}): {line!r} {open(log_path).read()[-3000:]}"
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    selenium_cache = tmp_path_factory.mktemp("selenium-cache")
    saved = {k: os.environ.get(k) for k in ("SE_MANAGER_PATH", "SE_CACHE_PATH", "SE_OFFLINE")}
    os.environ.update(SE_MANAGER_PATH="/nonexistent/selenium-manager", SE_CACHE_PATH=str(selenium_cache),
                      SE_OFFLINE="true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update", "--no-first-run",
                     f"--window-size={PAGE_WIDTH},900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        assert os.listdir(selenium_cache) == [], "Selenium Manager ran (it downloads drivers and browsers)"


def _status(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _load(browser, url):
    browser.get(url)
    return browser.find_element("tag name", "body").text


def _page_width(browser):
    return browser.execute_script("return document.documentElement.scrollWidth")


def _links(browser):
    return [a.get_attribute("href") for a in browser.find_elements("tag name", "a")]


def test_main_page_lists_every_day_of_the_home_with_its_run(home, dashboard, browser):
    _load(browser, dashboard + "/")
    rows = {r.find_elements("tag name", "td")[0].text: [c.text for c in r.find_elements("tag name", "td")]
            for r in browser.find_elements("css selector", "#runs + table tr") if r.find_elements("tag name", "td")}
    assert sorted(rows) == sorted([START.isoformat(), MISSING_DAY.isoformat()] + [d.isoformat() for d in RUN_DAYS])
    assert rows[START.isoformat()][1] == "ingested"
    assert rows[MISSING_DAY.isoformat()][1] == "failed" and "AvcExampleGen failed" in rows[MISSING_DAY.isoformat()][-1]
    for date in RUN_DAYS:
        result = json.load(open(os.path.join(home, "runs", f"{date.isoformat()}.json")))
        status, blessed, pushed, cached = rows[date.isoformat()][1:5]
        assert status == "complete"
        assert blessed == ("yes" if result["blessed"] else "no")
        assert pushed == (str(result["pushed_version"]) if result["pushed"] else "-")
        assert re.fullmatch(r"\d+ of 12", cached), cached  # ImportSchemaGen is cached from the day before
        assert rows[date.isoformat()][7] == f"{result['eval_rows']:,}" and rows[date.isoformat()][8] == "0"
    assert _page_width(browser) <= PAGE_WIDTH


def test_main_page_shows_what_serves_and_the_trends(home, dashboard, browser):
    text = _load(browser, dashboard + "/")
    base = os.path.join(home, "serving", config_lib.MODEL_NAME)
    versions = sorted(int(v) for v in os.listdir(base) if v.isdigit()) if os.path.isdir(base) else []
    serving = browser.find_element("css selector", "#serving + .box").text
    if versions:
        assert serving.startswith(f"Version {versions[-1]}, since ") and "pushed by the run of 2022-04-" in serving
    else:
        assert serving.startswith("Nothing served: no version pushed yet")
    charts = browser.find_elements("css selector", "#trends ~ .charts svg")
    titles = [c.find_element("css selector", "text.title").text for c in charts]
    assert titles == [f"{t.name}: GAUC per user group" for t in specs.TASKS] + ["AUC overall per task", "Rows per run"]
    # One dot per run summary on every line that has values on both days.
    assert len(charts[0].find_elements("tag name", "circle")) >= len(RUN_DAYS)
    assert "Home " + home in text


def test_day_page_shows_the_blessing_decision_with_values_thresholds_and_sizes(home, dashboard, browser):
    date = RUN_DAYS[-1].isoformat()
    result = json.load(open(os.path.join(home, "runs", f"{date}.json")))
    text = _load(browser, f"{dashboard}/runs/{date}")
    assert ("BLESSED" if result["blessed"] else "NOT blessed") in text
    facts = browser.find_element("css selector", "table.facts").text
    assert f"Model {result['variant']}" in facts, facts
    table = browser.find_element("xpath", "//h2[.='Blessing decision']/following-sibling::table[1]")
    cells = [[c.text for c in r.find_elements("tag name", "td")] for r in table.find_elements("tag name", "tr")[1:]]
    # BlessingGate's checks (pipeline/blessing.py), in its order: per primary task the floor, then,
    # with a baseline, the overall AUC and the new users' GAUC against it.
    checks = result["blessing_checks"]
    primary = [t.name for t in specs.TASKS if t.primary]
    assert [c["task"] for c in checks if c["rule"].startswith("candidate >")] == primary
    assert [(c[0], c[1]) for c in cells] == [(c["task"], c["slice"]) for c in checks]
    for (task, slice_name, metric, rule, candidate, baseline, change, size, verdict), check in zip(cells, checks):
        row = next(r for r in result["metrics"] if r["task"] == task and r["slice"] == slice_name)
        assert candidate == f"{row[metric.lower()]:.4f}" and size == f"{int(row['example_count']):,}"
        assert rule == check["rule"]
        assert verdict == {True: "pass", False: "FAIL", None: "not applied"}[check["passed"]]
    for failure in result.get("blessing_failures") or []:
        assert failure in text
    # Pipeline runs of the day from ML Metadata, and the plots.
    assert "daily run" in text and "Trainer" in text
    # AvcExampleGen's counts of the day (HOME/quarantine/DATE/summary.json) beside the quarantined rows.
    ingest = json.load(open(os.path.join(home, "quarantine", date, "summary.json")))
    assert f"duplicate rows {ingest['duplicate_rows']:,}" in text
    assert len(browser.find_elements("css selector", ".charts svg")) >= len(specs.TASKS) + 2
    assert _page_width(browser) <= PAGE_WIDTH


def test_every_link_works_and_every_page_fits_1280_px(dashboard, browser):
    """Follows every link from the main page, two levels deep (days, versions, models, summaries)."""
    seen, queue = set(), [dashboard + "/"]
    while queue:
        url = queue.pop(0)
        if url in seen:
            continue
        seen.add(url)
        assert _status(url) == 200, url
        if url.endswith(".json"):
            continue
        _load(browser, url)
        assert _page_width(browser) <= PAGE_WIDTH, url
        for link in _links(browser):
            link = urllib.parse.urldefrag(link)[0]
            assert link.startswith(dashboard + "/"), f"{url} links outside the dashboard: {link}"
            if link not in seen:
                queue.append(link)
    kinds = {re.sub(r"/[^/]*$", "/", urllib.parse.urlparse(u).path) for u in seen}
    assert {"/", "/runs/", "/models/"} <= kinds, seen
    assert _status(dashboard + "/runs/1999-01-01") == 404 and _status(dashboard + "/nothing") == 404


def test_failed_day_page_names_the_failed_step(dashboard, browser):
    text = _load(browser, f"{dashboard}/runs/{MISSING_DAY.isoformat()}")
    assert re.search(r"Status\s+failed", text) and re.search(r"Failed step\s+AvcExampleGen", text), text
    assert "No run summary for this day" in text


def test_lineage_of_a_days_model_names_its_window_transform_and_trainer_run(home, dashboard, browser):
    date = RUN_DAYS[-1]
    result = json.load(open(os.path.join(home, "runs", f"{date.isoformat()}.json")))
    _load(browser, f"{dashboard}/runs/{date.isoformat()}")
    browser.find_element("partial link text", "lineage").click()
    text = browser.find_element("tag name", "body").text
    assert result["candidate_model_dir"].rsplit("/", 1)[0] in text
    assert f"daily run of {date.isoformat()}" in text and "Transform" in text
    window = browser.find_element("xpath", "//h2[.='Training window']/following-sibling::table[1]")
    days = [r.find_elements("tag name", "td")[0].text for r in window.find_elements("tag name", "tr")[1:]]
    assert days == [result["train_window"][0]]
    if result["pushed"]:
        assert f"version {result['pushed_version']}" in text


def test_report_html_is_the_day_page_without_links_and_fits_1280_px(home, browser, tmp_path):
    date = RUN_DAYS[-1].isoformat()
    folder = os.path.join(home, "runs", date)
    text = _load(browser, "file://" + os.path.join(folder, "report.html"))
    assert f"daily run {date}" in text and "Blessing decision" in text and "Pipeline runs of the day" in text
    assert _links(browser) == [] and browser.find_elements("tag name", "img") == []
    gates = json.load(open(os.path.join(folder, report.GATES_FILE)))
    assert gates, "the candidate's gates signature gave no means"
    titles = [t.text for t in browser.find_elements("css selector", "svg text.title")]
    assert "Gates against the AVC bucket (POSO Fig. 4)" in titles
    assert _page_width(browser) <= PAGE_WIDTH


def test_ui_refuses_a_folder_that_is_not_a_home(tmp_path, capsys):
    args = type("Args", (), {"home": str(tmp_path / "none"), "host": "127.0.0.1", "port": 0})()
    assert server_lib.run(args) == 2
    assert "is not a pipeline home" in capsys.readouterr().err


def test_the_home_is_only_read(home, dashboard):
    """Serving the pages changes no file of the home (ML Metadata is opened read-only)."""
    def snapshot():
        return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
                for d, _, files in os.walk(home) for f in files}
    before = snapshot()
    for path in ("/", f"/runs/{RUN_DAYS[0].isoformat()}", f"/runs/{MISSING_DAY.isoformat()}"):
        assert _status(dashboard + path) == 200
    assert snapshot() == before


def test_main_page_screenshot(dashboard, browser, tmp_path_factory):
    """Last: a full-page screenshot of the main page to look at (path printed with -s; the folder
    is $POSO_SCREENSHOT_DIR when set, else pytest's temporary one)."""
    _load(browser, dashboard + "/")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(PAGE_WIDTH, min(height + 140, 4000))
    folder = os.environ.get("POSO_SCREENSHOT_DIR") or str(tmp_path_factory.mktemp("screenshot"))
    path = os.path.join(folder, "dashboard.png")
    assert browser.save_screenshot(path) and os.path.getsize(path) > 10000
    print(f"dashboard screenshot: {path}")
    browser.set_window_size(PAGE_WIDTH, 900)


# ---------------------------------------------------------------------------------------------
# Without a pipeline run: the serving policy and escaping, on fabricated homes.
# ---------------------------------------------------------------------------------------------
def _serving_home(tmp_path, policy):
    base = tmp_path / "serving" / config_lib.MODEL_NAME
    for version in ("1", "2", "3"):
        (base / version).mkdir(parents=True)
    if policy is not None:
        (tmp_path / "serving" / "models.config").write_text(
            f'model_config_list {{ config {{ name: "{config_lib.MODEL_NAME}" base_path: "{base}" '
            f'model_platform: "tensorflow" model_version_policy {{ {policy} }} }} }}')
    return data_lib.HomeReader(str(tmp_path))


@pytest.mark.parametrize("policy, shown, served", [
    ("latest { num_versions: 1 }", "latest 1", [3]),
    ("latest { num_versions: 2 }", "latest 2", [2, 3]),
    ("specific { versions: 2 }", "specific 2", [2]),
    ("specific { versions: 1 versions: 9 }", "specific 1, 9", [1]),
    ("all {}", "all", [1, 2, 3]),
])
def test_serving_follows_the_version_policy_of_models_config(tmp_path, policy, shown, served):
    serving = _serving_home(tmp_path, policy).serving()
    assert (serving.policy, serving.served, serving.versions) == (shown, served, [1, 2, 3])
    page = pages.serving_box(serving)
    assert page.startswith('<div class="box">Version <b>') and ("Pinned in models.config" in page) == ("specific" in policy)


def test_a_rollback_pin_is_shown_with_its_time(tmp_path):
    reader = _serving_home(tmp_path, "specific { versions: 2 }")
    with open(reader.cfg.pin_path, "w") as f:
        json.dump({"version": 2, "pinned_at": "2026-12-02T20:00:00+00:00"}, f)
    page = pages.serving_box(reader.serving())
    assert "Pinned to version 2 by <code>poso rollback</code> at 2026-12-02T20:00:00+00:00" in page


def test_values_from_the_home_are_escaped():
    evil = '<script>alert("x")</script>'
    summary = {"date": "2022-04-09", "train_window": ["2022-04-08", "2022-04-08"], "train_rows": 1, "eval_rows": 1,
               "blessed": False, "blessing_failures": [evil], "metrics": [{"slice": evil, "task": "click", "auc": 0.5}],
               "a_new_field": evil, "variant": evil}
    page = pages.day_page("2022-04-09", summary, None, {}, links=False)
    assert "<script>" not in page and page.count("&lt;script&gt;") == 4
