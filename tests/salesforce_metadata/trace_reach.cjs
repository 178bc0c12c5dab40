// Preloaded into the sf CLI by the tests (NODE_OPTIONS=--require): records every process it starts
// and every host it tries to reach, one JSON line each, to the file TRACE_REACH_FILE names.
// The calls still go ahead (the network namespace refuses them); this only makes them visible.
"use strict";

const fs = require("node:fs");
const childProcess = require("node:child_process");
const dns = require("node:dns");
const net = require("node:net");
const { syncBuiltinESMExports } = require("node:module");

const traceFile = process.env.TRACE_REACH_FILE;

function record(kind, what) {
  if (!traceFile) return;
  fs.appendFileSync(traceFile, JSON.stringify({ kind, what, pid: process.pid }) + "\n");
}

for (const name of ["spawn", "spawnSync", "exec", "execSync", "execFile", "execFileSync", "fork"]) {
  const original = childProcess[name];
  childProcess[name] = function traced(command, args, ...rest) {
    record("process", [String(command), ...(Array.isArray(args) ? args.map(String) : [])]);
    return original.call(this, command, args, ...rest);
  };
}
for (const name of ["lookup", "resolve", "resolve4", "resolve6"]) {
  const original = dns[name];
  dns[name] = function traced(hostname, ...rest) {
    record("dns", String(hostname));
    return original.call(this, hostname, ...rest);
  };
}
const originalConnect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function traced(...args) {
  const options = args[0];
  const where = typeof options === "object" && options !== null ? `${options.host || options.path}:${options.port || ""}` : String(options);
  record("connect", where);
  return originalConnect.apply(this, args);
};
syncBuiltinESMExports();
