"""Lua scripts of the Redis broker (after centrifuge's stream engine).

Every script touches the keys of ONE channel, all hash-tagged ``{channel}``,
so they share a Redis Cluster slot — and the publication's shard channel has
the same tag, so ``SPUBLISH`` from inside the script is allowed in a cluster.
The per-item scripts (``POSITIONS``, ``PRESENCE_ADD``) take several
channels' keys; on a cluster their caller groups the channels by slot
(:func:`signaling.state.redis.run_script_per_item`).
"""

from __future__ import annotations

from signaling.state.redis import LuaScript

__all__ = [
    "HISTORY",
    "POSITIONS",
    "PRESENCE_ADD",
    "PRESENCE_GET",
    "PRESENCE_REMOVE",
    "PRESENCE_STATS",
    "PUBLISH",
    "PUBLISH_CLAIMED",
]

# Append to the channel's stream and publish, atomically.
# KEYS: stream, meta. ARGV: body, maxlen, stream_ttl_ms, pubsub channel,
# meta_ttl_ms, epoch to use if the stream has none, publish command.
# The offset is the stream entry id; the epoch changes whenever the meta hash
# is lost (expiry, eviction, restart), which tells clients their position is
# gone. A new epoch (offset 1) drops entries of an older one.
_PUBLISH_BODY = """
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[6]
  redis.call('HSET', KEYS[2], 'e', epoch)
end
local offset = redis.call('HINCRBY', KEYS[2], 's', 1)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
if offset == 1 then
  redis.call('DEL', KEYS[1])
end
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], offset, 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call(ARGV[7], ARGV[4], 'p' .. offset .. ':' .. epoch .. ':' .. ARGV[1])
return {offset, epoch}
"""

PUBLISH = LuaScript(_PUBLISH_BODY)

# PUBLISH behind a claim of the state store, in one step (Node.publish_claimed).
# KEYS: stream, meta, the claim, then its guards. ARGV: PUBLISH's, then the
# claim's value and TTL in ms. Returns {0, 0} when the claim is taken already,
# {0, i} when the i-th guard exists (nothing claimed), else PUBLISH's {offset,
# epoch} (offsets start at 1). Scripts are not rolled back: the claim comes
# last among the checks and nothing below it can fail but Redis itself.
PUBLISH_CLAIMED = LuaScript(
    """
for i = 4, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    return {0, i - 3}
  end
end
if not redis.call('SET', KEYS[3], ARGV[8], 'NX', 'PX', ARGV[9]) then
  return {0, 0}
end
"""
    + _PUBLISH_BODY
)

# Read the stream top and a range of entries.
# KEYS: stream, meta. ARGV: epoch to create if none, meta_ttl_ms, since offset
# ('' = from the start/end), limit (-1 = all, 0 = none), reverse ('1'/'0').
HISTORY = LuaScript(
    """
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[2], 'e', epoch)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
local top = tonumber(redis.call('HGET', KEYS[2], 's') or '0')
local limit = tonumber(ARGV[4])
if limit == 0 then
  return {top, epoch, {}}
end
local entries
if ARGV[5] == '1' then
  local stop = '+'
  -- An end bound without a sequence means <ms>-<max>: '(N' would still
  -- include N-0, the entry of offset N itself. Nothing is before offset 0
  -- (and '(0-0' is an invalid bound).
  if ARGV[3] == '0' then
    return {top, epoch, {}}
  end
  if ARGV[3] ~= '' then stop = '(' .. ARGV[3] .. '-0' end
  if limit > 0 then
    entries = redis.call('XREVRANGE', KEYS[1], stop, '-', 'COUNT', limit)
  else
    entries = redis.call('XREVRANGE', KEYS[1], stop, '-')
  end
else
  local start = '-'
  if ARGV[3] ~= '' then start = '(' .. ARGV[3] end
  if limit > 0 then
    entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', limit)
  else
    entries = redis.call('XRANGE', KEYS[1], start, '+')
  end
end
return {top, epoch, entries}
"""
)

# Stream tops without creating anything, one per item (run_script_per_item).
# KEYS: a meta key per channel.
POSITIONS = LuaScript(
    """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HMGET', KEYS[i], 's', 'e')
end
return out
"""
)

# Add or refresh presence entries: one (a subscribe), or many per call (the
# periodic refresh, run_script_per_item), grouped by channel: one HSET, one
# ZADD and the two PEXPIREs per channel, not per entry (a refresh re-adds every
# local entry: a worker's 13,333 in 400 rooms took Redis 80-83 ms a round written
# entry by entry, 53-65 ms written channel by channel).
# KEYS: hash (client -> info), zset (client -> expiry) per channel. ARGV:
# expires_at (unix s), ttl_ms, then per channel its entry count n and n client,
# info pairs (n at most a few thousand: Lua's unpack limit).
PRESENCE_ADD = LuaScript(
    """
local out = {}
local at = 3
for i = 1, #KEYS / 2 do
  local n = tonumber(ARGV[at])
  local fields, scored = {}, {}
  for j = 1, n do
    local client = ARGV[at + 2 * j - 1]
    fields[2 * j - 1] = client
    fields[2 * j] = ARGV[at + 2 * j]
    scored[2 * j - 1] = ARGV[1]
    scored[2 * j] = client
  end
  redis.call('HSET', KEYS[2 * i - 1], unpack(fields))
  redis.call('ZADD', KEYS[2 * i], unpack(scored))
  redis.call('PEXPIRE', KEYS[2 * i - 1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2 * i], ARGV[2])
  out[i] = n
  at = at + 1 + 2 * n
end
return out
"""
)

# KEYS: hash, zset. ARGV: clients (at most a few thousand: Lua's unpack limit).
PRESENCE_REMOVE = LuaScript(
    """
redis.call('HDEL', KEYS[1], unpack(ARGV))
redis.call('ZREM', KEYS[2], unpack(ARGV))
return 1
"""
)

# The start of every presence read: drop the expired entries (of crashed
# instances). KEYS: hash, zset. ARGV: now (unix s).
_DROP_EXPIRED_PRESENCE = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if #expired > 0 then
  redis.call('HDEL', KEYS[1], unpack(expired))
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
end
"""

# The live entries. KEYS, ARGV: as _DROP_EXPIRED_PRESENCE.
PRESENCE_GET = LuaScript(
    _DROP_EXPIRED_PRESENCE
    + """
return redis.call('HGETALL', KEYS[1])
"""
)

# Counts of PRESENCE_GET's entries: (clients, distinct users). Counted in Redis:
# fetching and decoding every entry in Python only to count them was 11 % of an
# idle server's CPU (room viewer counts every few seconds).
PRESENCE_STATS = LuaScript(
    _DROP_EXPIRED_PRESENCE
    + """
local values = redis.call('HVALS', KEYS[1])
local seen, users = {}, 0
for _, raw in ipairs(values) do
  local user = cjson.decode(raw)['user']
  if user ~= nil and not seen[user] then
    seen[user] = true
    users = users + 1
  end
end
return {#values, users}
"""
)
