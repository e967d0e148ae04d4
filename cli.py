def main() -> int:
    raise SystemExit("sdgraph CLI not built yet")
