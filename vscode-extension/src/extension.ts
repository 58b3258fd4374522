/**
 * Entry point of the OnTheFly extension: commands, the `onthefly` launch configuration,
 * the dashboard panel (and its serializer), the session watcher and a status bar item.
 * Everything registered here goes to context.subscriptions and is disposed on deactivate.
 */
import * as path from 'node:path';
import * as vscode from 'vscode';
import { connectionFileFor } from './command';
import { LAUNCH_TYPE, OnTheFlyConfigurationProvider, createLauncher, endAtOnceAdapterFactory, runActiveScript } from './launch';
import { DASHBOARD_VIEW_TYPE, DashboardPanel, type PanelDeps, webviewOptions } from './panel';
import { SessionWatcher } from './session';

/** connection.json of the session to follow: the setting, else the first workspace folder's latest session. */
function connectionFile(): string {
  const configured = vscode.workspace.getConfiguration('onthefly').get<string>('connectionFile', '').trim();
  const folder = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
  if (configured) return path.isAbsolute(configured) || !folder ? configured : path.join(folder, configured);
  return connectionFileFor(folder ?? process.cwd());
}

function describeState(w: SessionWatcher): { text: string; tooltip: string } {
  const c = w.connection;
  const icons: Record<string, string> = {
    searching: '$(circle-outline)',
    connecting: '$(sync~spin)',
    connected: '$(pulse)',
    reconnecting: '$(sync~spin)',
    finished: '$(check)',
  };
  return { text: `${icons[c.state] ?? ''} OnTheFly`, tooltip: `OnTheFly: ${c.message}\nClick to show the dashboard.` };
}

export function activate(context: vscode.ExtensionContext): void {
  const output = vscode.window.createOutputChannel('OnTheFly');
  context.subscriptions.push(output);

  let watcher: SessionWatcher | undefined;
  const session = (): SessionWatcher => {
    if (!watcher) {
      watcher = new SessionWatcher({
        connectionFile: connectionFile(),
        protoPath: path.join(context.extensionPath, 'dist', 'proto', 'onthefly.proto'),
        callTimeoutMs: vscode.workspace.getConfiguration('onthefly').get<number>('rpcTimeoutSeconds', 15) * 1000,
        log: (line) => output.appendLine(`[session] ${line}`),
      });
      const w = watcher;
      context.subscriptions.push(w, w.onConnection.on(() => updateStatus()));
      w.start();
    }
    return watcher;
  };

  const status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Left, 50);
  status.command = 'onthefly.showDashboard';
  context.subscriptions.push(status);
  const updateStatus = (): void => {
    if (!watcher) return;
    const d = describeState(watcher);
    status.text = d.text;
    status.tooltip = d.tooltip;
    status.show();
  };

  const deps: PanelDeps = { extensionUri: context.extensionUri, session, output };
  const showDashboard = (): void => {
    DashboardPanel.createOrShow(deps);
  };
  const launcher = createLauncher(output, (cwd) => {
    // Follow the session just started: it writes <cwd>/.onthefly/... (a launch
    // configuration's cwd, or another folder of a multi-root workspace).
    const configured = vscode.workspace.getConfiguration('onthefly').get<string>('connectionFile', '').trim();
    if (!configured) session().retarget(connectionFileFor(cwd));
    session().kick();
    if (vscode.workspace.getConfiguration('onthefly').get<boolean>('openDashboardOnRun', true)) showDashboard();
  });

  context.subscriptions.push(
    vscode.commands.registerCommand('onthefly.showDashboard', showDashboard),
    vscode.commands.registerCommand('onthefly.runScript', (uri?: vscode.Uri) => runActiveScript(launcher, false, uri)),
    vscode.commands.registerCommand('onthefly.runScriptAutomode', (uri?: vscode.Uri) => runActiveScript(launcher, true, uri)),
    vscode.commands.registerCommand('onthefly.reconnect', () => session().kick()),
    vscode.debug.registerDebugConfigurationProvider(LAUNCH_TYPE, new OnTheFlyConfigurationProvider(launcher)),
    vscode.debug.registerDebugAdapterDescriptorFactory(LAUNCH_TYPE, endAtOnceAdapterFactory),
    vscode.window.registerWebviewPanelSerializer(DASHBOARD_VIEW_TYPE, {
      async deserializeWebviewPanel(panel: vscode.WebviewPanel) {
        panel.webview.options = webviewOptions(context.extensionUri);
        DashboardPanel.revive(panel, deps);
      },
    }),
    { dispose: () => DashboardPanel.disposeCurrent() },
  );

  // A new session (or a restarted supervisor) rewrites connection.json: react at once
  // instead of waiting for the watcher's poll.
  const fsWatcher = vscode.workspace.createFileSystemWatcher('**/.onthefly/sessions/**/connection.json');
  const poke = (): void => watcher?.kick();
  context.subscriptions.push(fsWatcher, fsWatcher.onDidCreate(poke), fsWatcher.onDidChange(poke), fsWatcher.onDidDelete(poke));

  context.subscriptions.push(
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration('onthefly.connectionFile')) watcher?.retarget(connectionFile());
    }),
    vscode.workspace.onDidChangeWorkspaceFolders(() => watcher?.retarget(connectionFile())),
  );

  // Start following a session right away when the workspace already has one.
  if (vscode.workspace.workspaceFolders?.length) {
    session();
    updateStatus();
  }
}

export function deactivate(): void {
  // Everything lives in context.subscriptions; VS Code disposes it.
}
