#!/usr/bin/env node
// The `virtmesh` command: runs cli/src/main.ts through tsx (TypeScript, CommonJS).
"use strict";
require("tsx/cjs");
require("../cli/src/main.ts");
