"""Print the NAT mapping check of the namespace it runs in; the logic lives in `hivewire.diagnostics`.

Run ``python -m tests.netlab.diagnose HOST:PORT HOST:PORT`` to print the mapping check as JSON.
"""

import argparse
import asyncio
import json

from hivewire.diagnostics import mapping_behaviour, stun_mapped_addresses


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    """Print the mapped addresses seen by each server and the mapping behaviour they imply, as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("servers", nargs="+", type=_address, help="STUN servers as HOST:PORT (two or more)")
    args = parser.parse_args()
    mapped = asyncio.run(stun_mapped_addresses(args.servers))
    print(json.dumps({"mapped": mapped, "behaviour": mapping_behaviour(mapped)}))


if __name__ == "__main__":
    main()
