"""One module per method: its frozen config dataclass and its ``init(params, config, key) -> Adapter``."""
