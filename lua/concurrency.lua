-- concurrency: at most `max` requests in flight per identity, across replicas.
--
-- KEY    a sorted set with one member per slot taken: member = the slot's number (the us it
--        was taken, made unique per key: a slot taken in the same microsecond as a live one
--        takes the next free number), score = the us at which the slot frees itself (taken +
--        lease), so the slots of a replica that died before releasing them expire on their own.
-- ARGV   (the limit's slot in decide.lua) p1 = max, p2 = lease us (the upstream's timeout plus
--        10 s), p3 unused. `cost` is ignored: a request takes one slot.
-- Result allowed, remaining slots, reset 0, retry_after 1 s when full, receipt = the slot's
--        number (released by concurrency_refund when the response ends), state
--        "<number>:<frees at>", ttl = the lease.
-- TTL    the lease, plus the slack, from the newest slot.
-- With `peek` nothing is written: slots that freed themselves are counted out instead.
local function concurrency(key, now, max, lease, _, _cost, peek)
  local taken
  if peek then
    taken = redis.call('ZCOUNT', key, '(' .. string.format('%d', now), '+inf')
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    taken = redis.call('ZCARD', key)
  end
  if taken < max then
    local member = now
    while true do
      local frees = redis.call('ZSCORE', key, string.format('%d', member))
      if not frees or tonumber(frees) <= now then break end
      member = member + 1
    end
    return 1, max - taken - 1, 0, 0, member,
      string.format('%d:%d', member, now + lease), lease
  end
  return 0, 0, 0, 1000000, 0
end

-- Takes the slot: its number with the time it frees itself.
local function concurrency_commit(key, state, _cost, ttl_us)
  local member, frees = string.match(state, '^(%d+):(%d+)$')
  redis.call('ZADD', key, frees, member)
  redis.call('PEXPIRE', key, ttl_ms(ttl_us))
end

-- Releases the slot numbered `receipt`.
local function concurrency_refund(key, receipt, _max, _lease, _unused, _cost)
  redis.call('ZREM', key, string.format('%d', receipt))
end
