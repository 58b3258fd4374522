/**
 * The one dashboard panel: created or revealed by "OnTheFly: Show Dashboard", revived
 * by VS Code after a reload (the serializer in extension.ts). It owns a Relay that links
 * the webview to the session; closing the panel disposes both.
 */
import * as path from 'node:path';
import * as vscode from 'vscode';
import { renderDashboardHtml } from './html';
import { type Dialogs, Relay } from './relay';
import type { SessionWatcher } from './session';

export const DASHBOARD_VIEW_TYPE = 'onthefly.dashboard';

export interface PanelDeps {
  extensionUri: vscode.Uri;
  /** The watcher of the current workspace's session (created on demand). */
  session: () => SessionWatcher;
  output: vscode.OutputChannel;
}

function mediaRoot(extensionUri: vscode.Uri): vscode.Uri {
  return vscode.Uri.joinPath(extensionUri, 'media');
}

export function webviewOptions(extensionUri: vscode.Uri): vscode.WebviewOptions {
  return { enableScripts: true, localResourceRoots: [mediaRoot(extensionUri)] };
}

function defaultDir(): vscode.Uri | undefined {
  return vscode.workspace.workspaceFolders?.[0]?.uri;
}

const vscodeDialogs: Dialogs = {
  async saveFile({ title, defaultName, filters }) {
    const dir = defaultDir();
    const uri = await vscode.window.showSaveDialog({
      title,
      filters: { ...filters, 'All files': ['*'] },
      defaultUri: dir ? vscode.Uri.joinPath(dir, defaultName) : vscode.Uri.file(path.join(process.cwd(), defaultName)),
      saveLabel: 'Export',
    });
    return uri?.fsPath;
  },
  async openFile({ title, filters }) {
    const uris = await vscode.window.showOpenDialog({
      title,
      filters: { ...filters, 'All files': ['*'] },
      canSelectMany: false,
      canSelectFiles: true,
      defaultUri: defaultDir(),
      openLabel: 'Import',
    });
    return uris?.[0]?.fsPath;
  },
  notify(level, text) {
    if (level === 'error') void vscode.window.showErrorMessage(`OnTheFly: ${text}`);
    else if (level === 'warning') void vscode.window.showWarningMessage(`OnTheFly: ${text}`);
    else void vscode.window.showInformationMessage(`OnTheFly: ${text}`);
  },
};

export class DashboardPanel implements vscode.Disposable {
  private static current: DashboardPanel | undefined;

  private readonly disposables: vscode.Disposable[] = [];
  private readonly relay: Relay;
  private disposed = false;

  /** Reveals the dashboard, creating it if needed. */
  static createOrShow(deps: PanelDeps): DashboardPanel {
    const column = vscode.window.activeTextEditor ? vscode.ViewColumn.Beside : vscode.ViewColumn.One;
    if (DashboardPanel.current) {
      DashboardPanel.current.panel.reveal(column);
      return DashboardPanel.current;
    }
    const panel = vscode.window.createWebviewPanel(DASHBOARD_VIEW_TYPE, 'OnTheFly', column, webviewOptions(deps.extensionUri));
    DashboardPanel.current = new DashboardPanel(panel, deps);
    return DashboardPanel.current;
  }

  /** Takes over a panel VS Code restored after a reload. */
  static revive(panel: vscode.WebviewPanel, deps: PanelDeps): DashboardPanel {
    DashboardPanel.current?.dispose();
    DashboardPanel.current = new DashboardPanel(panel, deps);
    return DashboardPanel.current;
  }

  static disposeCurrent(): void {
    DashboardPanel.current?.dispose();
  }

  private constructor(
    private readonly panel: vscode.WebviewPanel,
    deps: PanelDeps,
  ) {
    const webview = panel.webview;
    webview.options = webviewOptions(deps.extensionUri);
    panel.iconPath = vscode.Uri.joinPath(deps.extensionUri, 'media', 'icon.svg');
    const log = (line: string): void => deps.output.appendLine(`[dashboard] ${line}`);
    this.relay = new Relay(deps.session(), (msg) => webview.postMessage(msg), vscodeDialogs, log);
    this.disposables.push(
      this.relay,
      webview.onDidReceiveMessage((msg: unknown) => void this.relay.handle(msg)),
      panel.onDidDispose(() => this.dispose()),
    );
    const media = mediaRoot(deps.extensionUri);
    webview.html = renderDashboardHtml({
      cspSource: webview.cspSource,
      scriptUri: webview.asWebviewUri(vscode.Uri.joinPath(media, 'dist', 'webview.js')).toString(),
      styleUri: webview.asWebviewUri(vscode.Uri.joinPath(media, 'dist', 'webview.css')).toString(),
    });
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    if (DashboardPanel.current === this) DashboardPanel.current = undefined;
    for (const d of this.disposables.splice(0)) d.dispose();
    this.panel.dispose();
  }
}
