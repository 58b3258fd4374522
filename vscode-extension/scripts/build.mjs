// Builds the extension: copies the wire contract from ../proto (so the bundle always
// speaks the repository's .proto), bundles the host (node, CommonJS, `vscode` external)
// and the webview (browser IIFE + CSS) with esbuild.
//   node scripts/build.mjs            extension + webview
//   node scripts/build.mjs --tests    the tests too (out/test/**, node_modules external)
//   node scripts/build.mjs --watch    rebuild on change
import * as esbuild from 'esbuild';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = new Set(process.argv.slice(2));
const watch = args.has('--watch');
const tests = args.has('--tests');
const production = !watch && !args.has('--dev');

function copyProto() {
  const src = path.resolve(root, '..', 'proto', 'onthefly_proto', 'onthefly.proto');
  const dst = path.join(root, 'dist', 'proto', 'onthefly.proto');
  if (!fs.existsSync(src)) {
    throw new Error(`the wire contract ${src} is missing; the extension is built from the repository checkout`);
  }
  fs.mkdirSync(path.dirname(dst), { recursive: true });
  fs.copyFileSync(src, dst);
}

const common = {
  bundle: true,
  logLevel: 'warning',
  sourcemap: production ? false : 'linked',
  minify: production,
  legalComments: 'none',
};

const host = {
  ...common,
  entryPoints: [path.join(root, 'src', 'extension.ts')],
  outfile: path.join(root, 'dist', 'extension.js'),
  platform: 'node',
  format: 'cjs',
  target: 'node18',
  external: ['vscode'],
  // protobufjs probes optional modules with a computed require; they are not needed.
  logOverride: { 'unsupported-require-call': 'silent' },
};

const webview = {
  ...common,
  entryPoints: [path.join(root, 'media', 'main.ts')],
  outfile: path.join(root, 'media', 'dist', 'webview.js'),
  platform: 'browser',
  format: 'iife',
  target: 'es2022',
  // A webview must never pull node code in: fail the build if something tries.
  external: [],
};

function testEntries() {
  const out = [];
  for (const dir of ['unit', 'e2e']) {
    const d = path.join(root, 'test', dir);
    if (!fs.existsSync(d)) continue;
    for (const f of fs.readdirSync(d)) if (f.endsWith('.test.ts')) out.push(path.join(d, f));
  }
  return out;
}

const testBuild = {
  bundle: true,
  logLevel: 'warning',
  sourcemap: 'inline',
  entryPoints: testEntries(),
  outdir: path.join(root, 'out', 'test'),
  outbase: path.join(root, 'test'),
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  packages: 'external',
  outExtension: { '.js': '.cjs' },
};

copyProto();
if (watch) {
  const ctxs = await Promise.all([esbuild.context(host), esbuild.context(webview)]);
  await Promise.all(ctxs.map((c) => c.watch()));
  console.log('watching src/, media/, shared/ ...');
} else {
  const t0 = Date.now();
  await Promise.all([esbuild.build(host), esbuild.build(webview), ...(tests ? [esbuild.build(testBuild)] : [])]);
  console.log(`build: dist/extension.js, media/dist/webview.{js,css}${tests ? ', out/test/' : ''} in ${Date.now() - t0} ms`);
}
