"""`kit serve --bundle B`: load and verify a bundle, then serve /predict over HTTP."""

from __future__ import annotations

from pathlib import Path

import typer


def serve_command(
    bundle: Path = typer.Option(..., "--bundle", "-b", help="A bundle directory or .kitbundle (verified before serving)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
    token_file: Path = typer.Option(None, "--token-file", help="File holding the bearer token every request but /health must send."),
    max_request_mb: float = typer.Option(16.0, "--max-request-mb", min=0.001, help="Requests above this size get 413."),
    explain: bool = typer.Option(False, "--explain/--no-explain",
                                 help="Default for ?explain= (influential input events). Off unless asked: they cost "
                                      "~16x a prediction (docs/benchmarks.md); a request asks with ?explain=true."),
    fmt: str = typer.Option(None, "--format", help="Wire format (default: the vertical's own, fhir for clinical; json for any)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Rows per model batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes serving in parallel (each loads the bundle)."),
) -> None:
    """Serve a bundle: POST /predict (a FHIR Bundle in, a Bundle of RiskAssessment out), POST /predict/batch,
    GET /health, GET /metadata, OpenAPI docs at /docs. A bundle that fails verification stops the start with the reason.

    Example:

      kit serve --bundle kit-runs/demo/clinical.kitbundle --port 8080 --token-file /etc/kit/token

      curl -s -X POST -H 'Content-Type: application/fhir+json' -H "Authorization: Bearer $(cat /etc/kit/token)" \\
        --data-binary @patient-everything.json http://127.0.0.1:8080/predict
    """
    import json
    import os

    import uvicorn
    from rich.console import Console

    from kit.errors import KitError
    from kit.predict.formats import get_format
    from kit.predict.predictor import Predictor, relax_gc
    from kit.serve.app import ENV_CONFIG, HTTP_PROTOCOL, configure_logging, create_app

    console = Console(stderr=True)
    token = None
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as err:
            raise KitError(f"{token_file}: cannot read the token file ({err.strerror})") from None
        if len(token) < 16:
            raise KitError(f"{token_file}: the token is shorter than 16 characters; use a long random one",
                           hint="python -c 'import secrets; print(secrets.token_urlsafe(32))' > token")
    predictor = Predictor.load(bundle, device=device, batch_size=batch_size)  # verified here, before any worker starts
    if workers == 1:
        predictor.warm_up()
        relax_gc()
    get_format(predictor.bundle.vertical, fmt)  # an unknown --format stops here, not in each worker
    max_bytes = int(max_request_mb * (1 << 20))
    configure_logging(log_level)
    console.print(f"bundle verified: {bundle} ({predictor.name} {predictor.version}, {predictor.bundle.vertical}, "
                  f"tasks: {', '.join(predictor.tasks)}); auth: {'bearer token' if token else 'none'}; workers: {workers}")
    # uvicorn's access log prints query strings and client addresses; ours logs request ids, status and counts only.
    if workers == 1:
        app = create_app(predictor, token=token, max_bytes=max_bytes, explain=explain, fmt=fmt)
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, http=HTTP_PROTOCOL)
        return
    # Each worker gets its share of the cores: N workers each running torch's and polars' default pools (one thread
    # per core) oversubscribed the CPU, and two workers on two cores served no more than one (bench/serve.py).
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ.setdefault("POLARS_MAX_THREADS", str(threads))  # read when a worker process imports polars
    os.environ[ENV_CONFIG] = json.dumps({
        "bundle": str(bundle), "token_file": str(token_file) if token_file else None, "max_bytes": max_bytes,
        "explain": explain, "fmt": fmt, "batch_size": batch_size, "device": device, "log_level": log_level,
        "threads": threads})
    from kit.serve.workers import FD_PASSING, serve_workers

    if FD_PASSING:  # connections go to the least busy worker (see kit/serve/workers.py)
        del predictor
        raise typer.Exit(serve_workers(workers, host, port, log_level=log_level, http=HTTP_PROTOCOL, announce=lambda url:
                                       console.print(f"kit serve: {workers} workers on {url} (Ctrl+C to stop)")))
    uvicorn.run("kit.serve.app:app_from_env", factory=True, workers=workers, host=host, port=port,
                log_level=log_level, access_log=False, http=HTTP_PROTOCOL)


def register(app: typer.Typer) -> None:
    app.command("serve", no_args_is_help=True)(serve_command)
