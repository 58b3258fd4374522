/**
 * Starting `onthefly run` for a script: the "OnTheFly: Run Script" commands and the
 * `onthefly` launch configuration type. The supervisor runs in a terminal with the
 * interpreter the Python extension selected (ms-python API), else `python3`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as vscode from 'vscode';
import { type OnTheFlyLaunchConfig, buildRunCommand, describeCommand } from './command';

export const LAUNCH_TYPE = 'onthefly';

interface PythonExtensionApi {
  environments?: {
    getActiveEnvironmentPath?(resource?: vscode.Uri): { path: string } | undefined;
    resolveEnvironment?(env: { path: string }): Promise<{ executable?: { uri?: vscode.Uri } } | undefined>;
  };
  settings?: {
    getExecutionDetails?(resource?: vscode.Uri): { execCommand?: string[] } | undefined;
  };
}

/** The interpreter as a command prefix: setting, then the Python extension, then python3. */
export async function resolvePython(resource: vscode.Uri | undefined, explicit?: string): Promise<string[]> {
  if (explicit) return [explicit];
  const configured = vscode.workspace.getConfiguration('onthefly', resource).get<string>('pythonPath', '').trim();
  if (configured) return [configured];
  const ext = vscode.extensions.getExtension<PythonExtensionApi>('ms-python.python');
  if (ext) {
    try {
      const api = ext.isActive ? ext.exports : await ext.activate();
      const envPath = api?.environments?.getActiveEnvironmentPath?.(resource);
      if (envPath?.path) {
        const resolved = await api.environments?.resolveEnvironment?.(envPath);
        const exe = resolved?.executable?.uri?.fsPath;
        return [exe || envPath.path];
      }
      const exec = api?.settings?.getExecutionDetails?.(resource)?.execCommand;
      if (exec && exec.length) return exec;
    } catch {
      // The Python extension failing must not stop a run: fall back to python3.
    }
  }
  return ['python3'];
}

function folderFor(uri: vscode.Uri | undefined): vscode.WorkspaceFolder | undefined {
  return (uri && vscode.workspace.getWorkspaceFolder(uri)) || vscode.workspace.workspaceFolders?.[0];
}

export interface Launcher {
  /** Starts `onthefly run` in a new terminal; resolves to the terminal. */
  start(cfg: OnTheFlyLaunchConfig, folder: vscode.WorkspaceFolder | undefined): Promise<vscode.Terminal | undefined>;
}

/**
 * The launch type runs in a terminal, never in a debug session (resolve... returns
 * undefined). This inline adapter only exists so VS Code treats the type as supported;
 * if a session is ever started with it, it ends at once.
 */
class EndAtOnceAdapter implements vscode.DebugAdapter {
  private readonly emitter = new vscode.EventEmitter<vscode.DebugProtocolMessage>();
  readonly onDidSendMessage = this.emitter.event;
  private seq = 1;

  handleMessage(message: vscode.DebugProtocolMessage): void {
    const m = message as { seq?: number; type?: string; command?: string };
    if (m.type !== 'request') return;
    this.emitter.fire({ seq: this.seq++, type: 'response', request_seq: m.seq, success: true, command: m.command } as vscode.DebugProtocolMessage);
    if (m.command === 'initialize' || m.command === 'launch') this.emitter.fire({ seq: this.seq++, type: 'event', event: 'terminated' } as vscode.DebugProtocolMessage);
  }

  dispose(): void {
    this.emitter.dispose();
  }
}

export const endAtOnceAdapterFactory: vscode.DebugAdapterDescriptorFactory = {
  createDebugAdapterDescriptor: () => new vscode.DebugAdapterInlineImplementation(new EndAtOnceAdapter()),
};

export function createLauncher(output: vscode.OutputChannel, afterStart: (cwd: string) => void): Launcher {
  return {
    async start(cfg, folder) {
      const programUri = vscode.Uri.file(cfg.program);
      const ws = folder ?? folderFor(programUri);
      const defaultCwd = ws?.uri.fsPath ?? path.dirname(cfg.program);
      const python = await resolvePython(programUri, cfg.python);
      let cmd;
      try {
        cmd = buildRunCommand(python, cfg, defaultCwd);
      } catch (e) {
        void vscode.window.showErrorMessage(`OnTheFly: ${(e as Error).message}`);
        return undefined;
      }
      if (!fs.existsSync(cmd.program)) {
        void vscode.window.showErrorMessage(`OnTheFly: the script ${cfg.program} does not exist`);
        return undefined;
      }
      output.appendLine(`[run] (cd ${cmd.cwd} && ${describeCommand(cmd)})`);
      const terminal = vscode.window.createTerminal({
        name: `OnTheFly: ${path.basename(cmd.program)}`,
        cwd: cmd.cwd,
        shellPath: cmd.executable,
        shellArgs: cmd.args,
        env: cfg.env,
      });
      terminal.show(true);
      afterStart(cmd.cwd);
      return terminal;
    },
  };
}

/** "OnTheFly: Run Script" for the active Python file. */
export async function runActiveScript(launcher: Launcher, automode: boolean, uri?: vscode.Uri): Promise<void> {
  const target = uri ?? vscode.window.activeTextEditor?.document.uri;
  if (!target || target.scheme !== 'file' || !target.fsPath.endsWith('.py')) {
    void vscode.window.showErrorMessage('OnTheFly: open a Python training script first (the active editor is not a .py file).');
    return;
  }
  const doc = vscode.workspace.textDocuments.find((d) => d.uri.toString() === target.toString());
  if (doc?.isDirty) await doc.save();
  await launcher.start(
    { type: LAUNCH_TYPE, request: 'launch', name: 'OnTheFly: Run Script', program: target.fsPath, args: [], automode },
    folderFor(target),
  );
}

/** The `onthefly` launch configuration type: F5 starts `onthefly run` in a terminal. */
export class OnTheFlyConfigurationProvider implements vscode.DebugConfigurationProvider {
  constructor(private readonly launcher: Launcher) {}

  provideDebugConfigurations(): vscode.DebugConfiguration[] {
    return [
      { type: LAUNCH_TYPE, request: 'launch', name: 'OnTheFly: train the current file', program: '${file}', args: [], automode: false },
    ];
  }

  resolveDebugConfiguration(_folder: vscode.WorkspaceFolder | undefined, config: vscode.DebugConfiguration): vscode.DebugConfiguration | undefined {
    // F5 with no launch.json: train the active Python file.
    if (!config.type && !config.request && !config.name) {
      const editor = vscode.window.activeTextEditor;
      if (editor?.document.languageId !== 'python') return config;
      return { type: LAUNCH_TYPE, request: 'launch', name: 'OnTheFly: train the current file', program: '${file}', args: [], automode: false };
    }
    return config;
  }

  async resolveDebugConfigurationWithSubstitutedVariables(
    folder: vscode.WorkspaceFolder | undefined,
    config: vscode.DebugConfiguration,
  ): Promise<vscode.DebugConfiguration | undefined> {
    if (config.request !== 'launch') {
      void vscode.window.showErrorMessage('OnTheFly: only "request": "launch" is supported.');
      return undefined;
    }
    if (typeof config.program !== 'string' || !config.program) {
      void vscode.window.showErrorMessage('OnTheFly: the launch configuration needs "program" (the training script).');
      return undefined;
    }
    if (config.args !== undefined && (!Array.isArray(config.args) || config.args.some((a: unknown) => typeof a !== 'string'))) {
      void vscode.window.showErrorMessage('OnTheFly: "args" must be an array of strings.');
      return undefined;
    }
    await this.launcher.start(config as OnTheFlyLaunchConfig, folder);
    // The run lives in a terminal, not in a debug session: returning undefined ends the launch quietly.
    return undefined;
  }
}
