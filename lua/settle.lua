-- settle: after the response, brings the limits of one request from what admission reserved to
-- what the response says it cost, in one call. The script tollgate loads is prelude.lua, the
-- algorithm files, the dispatch tables (see decide.lua) and this file, joined.
--
-- KEYS[i]  the state key of limit i (one cluster slot per call).
-- ARGV[1]  now in us, or "" for the server's clock (as decide.lua).
-- ARGV[2 + 7 * (i - 1) .. 8 + 7 * (i - 1)]  limit i: algorithm code, p1, p2, p3, the units
--          reserved, the receipt decide.lua returned, the units the response cost.
--          cost < reserved: the difference is given back (the algorithm's refund: never more
--          than the request took, nothing once its window has passed); a `count` limit whose
--          status is not listed, a concurrency slot released and a held request whose client
--          went away settle to 0. cost > reserved: the excess is charged even past the quota
--          (the algorithm's charge), a debt later requests wait out.
-- Reply    the number of limits settled.
local now = decision_time()
for i = 1, #KEYS do
  local a = 1 + 7 * (i - 1)
  local code = tonumber(ARGV[a + 1])
  local p1, p2, p3 = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local reserved, receipt, cost = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  if cost < reserved then
    refunds[code](KEYS[i], receipt, p1, p2, p3, reserved - cost)
  elseif cost > reserved then
    charges[code](KEYS[i], now, p1, p2, p3, cost - reserved)
  end
end
return #KEYS
