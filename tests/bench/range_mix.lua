-- wrk script: every request asks for a random 1 MiB range of a file of BENCH_SIZE bytes.
local size = tonumber(os.getenv("BENCH_SIZE") or "67108864")
local span = 1048576

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
  local first = math.random(0, size - span)
  return wrk.format("GET", nil, {["Range"] = "bytes=" .. first .. "-" .. (first + span - 1)})
end
