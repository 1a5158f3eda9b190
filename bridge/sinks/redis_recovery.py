"""What a Redis stream holds of a source, for :mod:`bridge.state.recovery`.

The items hash ``{<stream>}:items`` names every live item and the entry of its last event;
:data:`SCAN_SCRIPT` walks it (``HSCAN``, :data:`SCAN_COUNT` fields per call, so one call holds
the server briefly) and returns, per item, only the ``koprs-version`` and ``koprs-revision``
fields of that entry (not its data). :data:`HEAD_SCRIPT` first reads the number of items, the
stream's length and the revision of its last entry (the latest event, whatever its item: the
largest revision, also when it was a ``Removed``).

An entry the hash names but ``MAXLEN`` trimmed leaves its item with an unknown version (a
warning, and the item is announced again once). The sink's ``maxlen`` below the number of
items is reported first: trimming then drops the entries of long-unchanged items.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio

from bridge.cloudevents import REVISION_HEADER, VERSION_HEADER, header_value
from bridge.state.recovery import UNKNOWN_VERSION, Published

__all__ = ["HEAD_SCRIPT", "SCAN_COUNT", "SCAN_SCRIPT", "read_published"]

SCAN_COUNT = 2000

HEAD_SCRIPT = """
-- KEYS[1] stream, KEYS[2] items hash
-- returns {number of items, stream length, koprs-revision of the last entry (or false)}
local items = redis.call('HLEN', KEYS[2])
if redis.call('TYPE', KEYS[1]).ok ~= 'stream' then return {items, 0, false} end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local revision = false
if #last > 0 then
  local fields = last[1][2]
  for j = 1, #fields, 2 do
    if fields[j] == ARGV[1] then revision = fields[j + 1] end
  end
end
return {items, redis.call('XLEN', KEYS[1]), revision}
"""

SCAN_SCRIPT = """
-- KEYS[1] stream, KEYS[2] items hash; ARGV[1] cursor, ARGV[2] count, ARGV[3] version field,
-- ARGV[4] revision field
-- returns {next cursor, key1, version1, revision1, key2, ...}: version '' when the entry has
-- no version field, false (nil) when it was trimmed
local scan = redis.call('HSCAN', KEYS[2], ARGV[1], 'COUNT', ARGV[2])
local out = {scan[1]}
local flat = scan[2]
for i = 1, #flat, 2 do
  local entry = redis.call('XRANGE', KEYS[1], flat[i + 1], flat[i + 1])
  local version, revision = false, false
  if #entry > 0 then
    version = ''
    local fields = entry[1][2]
    for j = 1, #fields, 2 do
      if fields[j] == ARGV[3] then version = fields[j + 1]
      elseif fields[j] == ARGV[4] then revision = fields[j + 1] end
    end
  end
  out[#out + 1] = flat[i]
  out[#out + 1] = version
  out[#out + 1] = revision
end
return out
"""


async def read_published(
    client: redis.asyncio.Redis, stream: str, items_key: str, *, maxlen: int
) -> Published:
    """Read the live items of one stream (see the module docstring)."""
    published = Published()
    keys = (stream, items_key)
    head: Any = await client.execute_command(  # type: ignore[no-untyped-call]
        "EVAL", HEAD_SCRIPT, 2, *keys, REVISION_HEADER
    )
    count, length, last_revision = head
    if last_revision is not None:
        published.revision = int(last_revision)
    if int(count) > maxlen:
        published.warnings.append(
            f"{items_key} holds {count} items but the sink's maxlen is {maxlen} (the stream "
            f"holds {length} entries): trimming drops the last entry of long-unchanged items "
            "(raise maxlen above the number of items)"
        )
    cursor = b"0"
    while True:
        reply: Any = await client.execute_command(  # type: ignore[no-untyped-call]
            "EVAL", SCAN_SCRIPT, 2, *keys, cursor, SCAN_COUNT, VERSION_HEADER, REVISION_HEADER
        )
        cursor = reply[0]
        _take(published, reply)
        if cursor in (b"0", "0", 0):
            return published


def _take(published: Published, reply: list[Any]) -> None:
    items = published.items
    for index in range(1, len(reply), 3):
        raw_key, raw_version, raw_revision = reply[index : index + 3]
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        published.read += 1
        if raw_revision is not None:
            revision = int(raw_revision)
            if published.revision is None or revision > published.revision:
                published.revision = revision
        if not raw_version:  # trimmed, or published without the field
            published.unreadable += 1
            items[key] = UNKNOWN_VERSION
            continue
        text = raw_version.decode() if isinstance(raw_version, bytes) else str(raw_version)
        try:
            items[key] = header_value(text)
        except ValueError:
            published.unreadable += 1
            items[key] = UNKNOWN_VERSION
