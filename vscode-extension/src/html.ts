/**
 * The dashboard page: a shell that loads the webview bundle under a strict Content
 * Security Policy with a fresh nonce per load. No vscode import — the browser end-to-end
 * test serves exactly this page.
 */
import { randomBytes } from 'node:crypto';

export interface PageResources {
  /** webview.cspSource in VS Code; the test server's origin in the browser test. */
  cspSource: string;
  scriptUri: string;
  styleUri: string;
  /** Per-load nonce; a fresh one when omitted. */
  nonce?: string;
}

export function makeNonce(): string {
  return randomBytes(18).toString('base64');
}

function attr(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/"/g, '&quot;').replace(/</g, '&lt;');
}

export function renderDashboardHtml(r: PageResources): string {
  const nonce = r.nonce ?? makeNonce();
  const csp = [
    "default-src 'none'",
    `img-src ${r.cspSource} data: blob:`,
    `style-src ${r.cspSource} 'nonce-${nonce}'`,
    `font-src ${r.cspSource}`,
    `script-src 'nonce-${nonce}'`,
  ].join('; ');
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<meta http-equiv="Content-Security-Policy" content="${attr(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<link rel="stylesheet" nonce="${attr(nonce)}" href="${attr(r.styleUri)}">
<title>OnTheFly</title>
</head>
<body>
<div id="app" data-nonce="${attr(nonce)}"><p class="boot">Loading the OnTheFly dashboard…</p></div>
<script nonce="${attr(nonce)}" src="${attr(r.scriptUri)}"></script>
</body>
</html>`;
}
