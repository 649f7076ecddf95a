"""``zimage-operator``: runs the ZImageService operator (a wrapper around ``kopf run``)."""

from __future__ import annotations

import logging
import sys

import kopf
from pydantic import ValidationError
from pydantic_settings import CliApp

from .config import OperatorSettings


def main(argv: list[str] | None = None) -> int:
    try:
        settings = CliApp.run(OperatorSettings, cli_args=list(sys.argv[1:] if argv is None else argv))
    except ValidationError as exc:
        print(f"zimage-operator: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.log_level != "debug":
        # Kopf logs every handler call at INFO; keep its warnings and errors.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    from . import handlers  # noqa: F401  (registers the handlers)

    scope = ", ".join(settings.namespaces) or "all namespaces"
    logging.getLogger(__name__).info("watching %s", scope)
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=f"http://{settings.health_host}:{settings.health_port}/healthz",
        memo=kopf.Memo(settings=settings),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
