"""``dalle serve``: the web UI and JSON API (:mod:`dalle.serving`) for a trained run.

    dalle serve --run runs/demo                  # then open http://127.0.0.1:8000/
    dalle serve --run runs/demo --port 8080 --max-n 128 --save-dir served/
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from dalle.commands.generate import ModelsConfig, load_generator
from dalle.config import add_options, check, from_args, option

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServeConfig(ModelsConfig):
    host: str = option("127.0.0.1", "address to listen on; 0.0.0.0 lets other machines in (there is no "
                       "authentication: only do this on a network you trust)")
    port: int = option(8000, "port to listen on (0: any free port)")
    max_n: int = option(64, "most candidates one request may draw; a request's time grows with it")
    max_body: int = option(16 * 1024 * 1024, "largest request body in bytes (an uploaded image travels as base64)")
    save_dir: Path | None = option(None, "also write every answer's images and settings to a folder of its own here")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.save_dir = Path(self.save_dir) if self.save_dir is not None else None
        check(0 <= self.port <= 65535, self, "port", "must be between 0 and 65535")
        check(self.max_n >= 1, self, "max_n", "must be at least 1")
        check(self.max_body >= 1024, self, "max_body", "must be at least 1024 bytes")
        check(self.host.strip() != "", self, "host", "must not be empty")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve", help="a web UI (and JSON API) for drawing images from captions and completing images",
        description="Load a run's models once and serve a page where captions become reranked images, and where an "
        "uploaded image's top rows are completed for a caption. The page and its API (GET /api/info, POST "
        "/api/generate, POST /api/complete) take the options of `dalle generate`. One request is drawn at a time.")
    add_options(parser, ServeConfig, title="serving")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from dalle.serving.app import make_server
    from dalle.serving.service import GenerationService, ServiceLimits

    cfg = from_args(ServeConfig, args)
    print(f"loading the models of {cfg.run or cfg.prior} ...", flush=True)
    generator, models = load_generator(cfg)
    limits = ServiceLimits(max_n=cfg.max_n, default_n=min(8, cfg.max_n), default_keep=min(4, cfg.max_n))
    service = GenerationService(generator, limits, save_dir=cfg.save_dir, models=models)
    server = make_server(service, cfg.host, cfg.port, cfg.max_body)
    print(f"serving {cfg.run or cfg.prior} at {server.url} (Ctrl-C stops)", flush=True)
    if cfg.save_dir is not None:
        print(f"every answer is also saved under {cfg.save_dir}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0
