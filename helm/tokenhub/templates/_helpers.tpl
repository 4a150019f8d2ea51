{{- /*
  Names and labels, after Zero to JupyterHub's _helpers-names.tpl and
  _helpers.tpl: one place decides every resource name, and every object
  carries both the legacy labels (app, release, component, chart, heritage)
  and the app.kubernetes.io/* ones. Selectors use the legacy subset
  (component, app, release), as Z2JH's do, so they never change on upgrade.
*/}}

{{- /* The prefix of every resource name. */}}
{{- define "tokenhub.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := .Values.nameOverride | default .Chart.Name -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end }}

{{- /* The Secret holding the crypt keys and client secrets. */}}
{{- define "tokenhub.secret.fullname" -}}
{{- .Values.existingSecret | default (include "tokenhub.fullname" .) -}}
{{- end }}

{{- /* The PersistentVolumeClaim for SQLite. */}}
{{- define "tokenhub.pvc.fullname" -}}
{{- include "tokenhub.fullname" . | trunc 58 | trimSuffix "-" }}-data
{{- end }}

{{- define "tokenhub.appLabel" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{- /* Selector labels: legacy only, stable across upgrades. */}}
{{- define "tokenhub.matchLabels" -}}
component: tokenhub
app: {{ include "tokenhub.appLabel" . | quote }}
release: {{ .Release.Name | quote }}
{{- end }}

{{- /* All labels: legacy and app.kubernetes.io/*. */}}
{{- define "tokenhub.labels" -}}
{{ include "tokenhub.matchLabels" . }}
chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
heritage: {{ .Release.Service }}
app.kubernetes.io/component: tokenhub
app.kubernetes.io/name: {{ include "tokenhub.appLabel" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- /* The image reference. */}}
{{- define "tokenhub.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end }}

{{- /* true when the vault is PostgreSQL (a URL or a Secret holding one). */}}
{{- define "tokenhub.postgres" -}}
{{- if or .Values.database.existingSecret.name (regexMatch "^postgres(ql)?://" .Values.database.url) -}}
true
{{- end -}}
{{- end }}

{{- /* The SQLite file on the chart's volume, in the form src/vault/store.rs takes
  (sqlx: everything after sqlite:// is the path; mode=rwc creates it). */}}
{{- define "tokenhub.sqliteUrl" -}}
sqlite:///data/tokenhub.sqlite?mode=rwc
{{- end }}

{{- /* publicUrl without a trailing slash; no query or fragment. */}}
{{- define "tokenhub.publicUrl" -}}
{{- $url := .Values.publicUrl -}}
{{- $parsed := urlParse $url -}}
{{- if or $parsed.query $parsed.fragment -}}
{{- fail "publicUrl must not have a query or fragment" -}}
{{- end -}}
{{- $url | trimSuffix "/" -}}
{{- end }}

{{- /* The path every route lives under ("" at the root). */}}
{{- define "tokenhub.basePath" -}}
{{- (urlParse (include "tokenhub.publicUrl" .)).path | trimSuffix "/" -}}
{{- end }}

{{- /* The Ingress host: ingress.host or publicUrl's host without a port. */}}
{{- define "tokenhub.ingressHost" -}}
{{- .Values.ingress.host | default (regexReplaceAll ":[0-9]+$" (urlParse (include "tokenhub.publicUrl" .)).host "") -}}
{{- end }}

{{- /*
  The values the chart cannot work without, checked in one place so that one
  message names every missing value (each template includes this first).
*/}}
{{- define "tokenhub.checks" -}}
{{- $missing := list -}}
{{- if not .Values.publicUrl -}}
{{- $missing = append $missing "publicUrl (tokenhub as browsers reach it, e.g. https://hub.example.org/services/tokenhub)" -}}
{{- end -}}
{{- if not .Values.oidc.issuer -}}
{{- $missing = append $missing "oidc.issuer (the IdP's issuer URL, e.g. https://cilogon.org)" -}}
{{- end -}}
{{- if not .Values.oidc.clientId -}}
{{- $missing = append $missing "oidc.clientId (tokenhub's client id at the IdP)" -}}
{{- end -}}
{{- if not (or .Values.oidc.clientSecret .Values.existingSecret (hasKey ((lookup "v1" "Secret" .Release.Namespace (include "tokenhub.fullname" .)).data | default dict) "oidc-client-secret")) -}}
{{- $missing = append $missing "oidc.clientSecret (tokenhub's client secret at the IdP; or name your Secret in existingSecret)" -}}
{{- end -}}
{{- if not .Values.jupyterhub.redirectUri -}}
{{- $missing = append $missing "jupyterhub.redirectUri (the hub's OAuth callback, e.g. https://hub.example.org/hub/oauth_callback)" -}}
{{- end -}}
{{- if $missing -}}
{{- fail (printf "\n\ntokenhub needs these values:\n  - %s" (join "\n  - " $missing)) -}}
{{- end -}}
{{- end }}

{{- /* The vault's settings from the Secrets (the crypt keys, and the
  PostgreSQL URL when there is one): the Deployment and the Jobs share them. */}}
{{- define "tokenhub.vaultEnv" -}}
- name: TOKENHUB_CRYPT_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "tokenhub.secret.fullname" . }}
      key: crypt-key
{{- if .Values.database.existingSecret.name }}
- name: TOKENHUB_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret.name }}
      key: {{ .Values.database.existingSecret.key }}
{{- else if .Values.database.url }}
- name: TOKENHUB_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tokenhub.fullname" . }}
      key: database-url
{{- end }}
{{- end }}
