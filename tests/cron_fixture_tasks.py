"""Tasks for tests/test_cron.py: a worker serving this module stores the `@task(cron=...)` schedule."""

from actors.worker import task


@task(queue="cronq", cron="0 3 * * *", cron_tz="Europe/Berlin")
def nightly_report() -> str:
    return "done"


@task(queue="cronq")
def add(a: int, b: int) -> int:
    return a + b
