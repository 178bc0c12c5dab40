#!/usr/bin/env node
// Lints Flow metadata offline with Lightning Flow Scanner's default rules (its core package's API:
// parse, then scan with no rule configuration, which runs every rule of the default store).
//
//   node scripts/scan-flows.cjs [FLOW_FILE...]   (default: every force-app/main/default/flows/*.flow-meta.xml)
//
// Prints one JSON object: {"rules": [...names run], "flows": [{"flow", "file", "violations": [...]}],
// "errors": [...]}. Exit 0 when no rule is violated, 1 when one is, 2 when a flow could not be
// parsed or a rule failed to run (the scanner reports those instead of throwing: they must not
// pass as clean).
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { parse, scan } = require("@flow-scanner/lightning-flow-scanner-core");

const FLOWS_DIR = path.join(__dirname, "..", "force-app", "main", "default", "flows");

function flowFiles(args) {
  if (args.length > 0) return args.map((file) => path.resolve(file));
  return fs
    .readdirSync(FLOWS_DIR)
    .filter((name) => name.endsWith(".flow-meta.xml"))
    .sort()
    .map((name) => path.join(FLOWS_DIR, name));
}

async function main() {
  const files = flowFiles(process.argv.slice(2));
  const parsed = await parse(files);
  const errors = parsed
    .filter((p) => p.errorMessage || !p.flow)
    .map((p) => ({ file: p.uri, error: p.errorMessage || "not parsed" }));
  const results = scan(parsed);
  const rules = new Set();
  const flows = results.map((result) => {
    const violations = [];
    for (const rule of result.ruleResults) {
      rules.add(rule.ruleName);
      if (rule.errorMessage) errors.push({ flow: result.flow.name, rule: rule.ruleName, error: rule.errorMessage });
      if (rule.occurs) {
        violations.push({
          rule: rule.ruleName,
          severity: rule.severity,
          details: rule.details.map((d) => ({ name: d.name, type: d.type, expression: d.expression })),
        });
      }
    }
    return { flow: result.flow.name, file: result.flow.fsPath || null, violations };
  });
  if (flows.length + errors.length < files.length) {
    errors.push({ error: `scanned ${flows.length} of ${files.length} flows` });
  }
  process.stdout.write(JSON.stringify({ rules: [...rules].sort(), flows, errors }, null, 2) + "\n");
  if (errors.length > 0) return 2;
  return flows.some((f) => f.violations.length > 0) ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    process.stderr.write(`${error && error.stack ? error.stack : error}\n`);
    process.exit(2);
  },
);
