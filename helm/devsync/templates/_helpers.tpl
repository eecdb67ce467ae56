{{/*
Names, labels and the pieces every devsync pod shares: image, security context, environment,
volumes. The per-service resources are in _component.tpl; each service's file calls it.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "devsync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" (or fullnameOverride), the prefix of every resource name. */}}
{{- define "devsync.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of a per-component resource: "<fullname>-<component>". Call with (dict "root" $ "name" "x"). */}}
{{- define "devsync.componentName" -}}
{{- printf "%s-%s" (include "devsync.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the release's pods. */}}
{{- define "devsync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "devsync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "devsync.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "devsync.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: devsync
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component. Call with (dict "root" $ "name" "x"). */}}
{{- define "devsync.componentSelectorLabels" -}}
{{ include "devsync.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* Labels of one component's resources. Call with (dict "root" $ "name" "x"). */}}
{{- define "devsync.componentLabels" -}}
{{ include "devsync.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* The ServiceAccount the release's pods use. */}}
{{- define "devsync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "devsync.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The ServiceAccount of the pre-install hook (created as a hook: it runs before the release's objects exist). */}}
{{- define "devsync.hookServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- printf "%s-hooks" (include "devsync.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- include "devsync.serviceAccountName" . }}
{{- end }}
{{- end }}

{{/* The image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "devsync.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Pod-level fields every devsync pod shares. */}}
{{- define "devsync.podCommon" -}}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  runAsNonRoot: true
  {{- with .Values.podSecurityContext }}
  {{- if not (kindIs "invalid" .runAsUser) }}
  runAsUser: {{ .runAsUser }}
  {{- end }}
  {{- if not (kindIs "invalid" .runAsGroup) }}
  runAsGroup: {{ .runAsGroup }}
  {{- end }}
  {{- if not (kindIs "invalid" .fsGroup) }}
  fsGroup: {{ .fsGroup }}
  {{- end }}
  {{- end }}
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{/* The container security context: fixed, not configurable. */}}
{{- define "devsync.containerSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  privileged: false
  capabilities:
    drop:
      - ALL
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{/*
Environment of a devsync container. Call with
(dict "root" $ "identity" "requestor" "env" <map> "settings" <map>).
`identity` names the NATS credentials to use: the service's own name, or "admin" for devsyncctl
(the migrate hook and the helm test). Services only verify the topology at start
(DEVSYNC_TOPOLOGY__DECLARE_ON_START=false): their NATS users may not create streams, and the
hook's `devsyncctl bootstrap` declares it. `settings` are the service's own settings from its
values (devsync.serviceSettings). Plain settings are sorted by name; the component's env wins
over config.env, which wins over the chart's. Credentials only ever come from secretKeyRef.
*/}}
{{- define "devsync.env" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $settings := dict
  "DEVSYNC_CONFIG" "/etc/devsync/devsync.toml"
  "DEVSYNC_HTTP__LISTEN" "0.0.0.0:8080"
  "DEVSYNC_NATS__URL" $v.nats.url
  "DEVSYNC_LOG__FORMAT" $v.config.log.format
  "DEVSYNC_LOG__LEVEL" $v.config.log.level
  "DEVSYNC_TOPOLOGY__PARTITIONS" (toString (int $v.config.partitions))
  "DEVSYNC_TOPOLOGY__REPLICAS" (toString (int $v.config.streamReplicas))
  "DEVSYNC_TOPOLOGY__DECLARE_ON_START" (ternary "true" "false" (eq .identity "admin"))
  "DEVSYNC_SHUTDOWN__DRAIN_TIMEOUT" (printf "%ds" (int $v.config.drainTimeoutSeconds))
}}
{{- with $v.otel.endpoint }}
{{- $_ := set $settings "OTEL_EXPORTER_OTLP_ENDPOINT" . }}
{{- $_ := set $settings "OTEL_SERVICE_NAME" (printf "devsync-%s" $.identity) }}
{{- end }}
{{- $settings = mustMergeOverwrite $settings (default (dict) .settings) (default (dict) $v.config.env) (default (dict) .env) -}}
- name: DEVSYNC_INSTANCE
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- range $name := keys $settings | sortAlpha }}
- name: {{ $name }}
  value: {{ index $settings $name | toString | quote }}
{{- end }}
- name: DEVSYNC_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.database.existingSecret }}
      key: {{ $v.database.urlKey }}
{{- if eq $v.nats.auth.type "userPassword" }}
- name: DEVSYNC_NATS__USER
  valueFrom:
    secretKeyRef:
      name: {{ $v.nats.auth.existingSecret }}
      key: {{ printf "%s-user" .identity }}
- name: DEVSYNC_NATS__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.nats.auth.existingSecret }}
      key: {{ printf "%s-password" .identity }}
{{- else if eq $v.nats.auth.type "credsFile" }}
- name: DEVSYNC_NATS__CREDS_FILE
  value: {{ printf "/etc/devsync/nats/%s.creds" .identity | quote }}
{{- end }}
{{- end }}

{{/*
The settings of one service that the chart renders from its values, as a YAML map of environment
variables (DEVSYNC_<SERVICE>__<KEY>, upper case; durations as written, e.g. "30s"). Call with
(dict "root" $ "name" "<service>").
*/}}
{{- define "devsync.serviceSettings" -}}
{{- $v := .root.Values }}
{{- $s := dict }}
{{- if eq .name "requestor" }}
{{- with $v.requestor.scheduler }}
{{- $_ := set $s "DEVSYNC_REQUESTOR__SCHEDULER__SWEEP_EVERY" .sweepEvery }}
{{- $_ := set $s "DEVSYNC_REQUESTOR__SCHEDULER__DRIFT_AFTER" .driftAfter }}
{{- $_ := set $s "DEVSYNC_REQUESTOR__SCHEDULER__INACTIVE_AFTER" .inactiveAfter }}
{{- $_ := set $s "DEVSYNC_REQUESTOR__SCHEDULER__CAMPAIGN_EXPIRY" .campaignExpiry }}
{{- end }}
{{- $_ := set $s "DEVSYNC_REQUESTOR__SCHEDULER__ACTIVE_WINDOW" $v.config.activeWindow }}
{{- else if eq .name "reconciler" }}
{{- $_ := set $s "DEVSYNC_RECONCILER__ACTIVE_WINDOW" $v.config.activeWindow }}
{{- else if eq .name "fanout" }}
{{- $_ := set $s "DEVSYNC_FANOUT__DEFAULT_POLICY" $v.fanout.defaultPushPolicy }}
{{- $_ := set $s "DEVSYNC_FANOUT__ACTIVE_WINDOW" $v.config.activeWindow }}
{{- with $v.fanout.webhooks }}
{{- $_ := set $s "DEVSYNC_FANOUT__WEBHOOK_TIMEOUT" .timeout }}
{{- $_ := set $s "DEVSYNC_FANOUT__WEBHOOK_ATTEMPTS" (toString (int .attempts)) }}
{{- $_ := set $s "DEVSYNC_FANOUT__WEBHOOK_WORKERS" (toString (int .workers)) }}
{{- $_ := set $s "DEVSYNC_FANOUT__BREAKER_FAILURES" (toString (int .breakerFailures)) }}
{{- $_ := set $s "DEVSYNC_FANOUT__BREAKER_OPEN" .breakerOpen }}
{{- end }}
{{- end }}
{{- toYaml $s }}
{{- end }}

{{/* Volume mounts of a devsync container. Call with (dict "root" $ "identity" "x"). */}}
{{- define "devsync.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: config
  mountPath: /etc/devsync/devsync.toml
  subPath: devsync.toml
  readOnly: true
{{- if eq .root.Values.nats.auth.type "credsFile" }}
- name: nats-creds
  mountPath: /etc/devsync/nats
  readOnly: true
{{- end }}
{{- end }}

{{/* Volumes of a devsync pod. Call with (dict "root" $ "identity" "x" "configMap" "<name>"). */}}
{{- define "devsync.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
- name: config
  configMap:
    name: {{ .configMap }}
{{- if eq .root.Values.nats.auth.type "credsFile" }}
- name: nats-creds
  secret:
    secretName: {{ .root.Values.nats.auth.existingSecret }}
    defaultMode: 288  # 0440: owner and group (fsGroup) may read
    items:
      - key: {{ printf "%s.creds" .identity }}
        path: {{ printf "%s.creds" .identity }}
{{- end }}
{{- end }}

{{/* The content of /etc/devsync/devsync.toml. */}}
{{- define "devsync.configFile" -}}
# devsync settings rendered by the Helm chart (values: config.toml). Environment variables
# (DEVSYNC_*) win over this file.
{{ .Values.config.toml }}
{{- end }}

{{/*
Render-time checks of settings that involve several values. Fails the render with a message
naming the value to change.
*/}}
{{- define "devsync.validate" -}}
{{- $drain := int .Values.config.drainTimeoutSeconds }}
{{- range $name := list "requestor" "reconciler" "fanout" "audit" }}
{{- $c := index $.Values $name }}
{{- $needed := add $drain (int $c.preStopSleepSeconds) }}
{{- if le (int $c.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be greater than %s.preStopSleepSeconds + config.drainTimeoutSeconds (%d)" $name (int $c.terminationGracePeriodSeconds) $name $needed) }}
{{- end }}
{{- $keda := default (dict) $c.keda }}
{{- if and $c.hpa.enabled $keda.enabled }}
{{- fail (printf "%s: hpa.enabled and keda.enabled are exclusive (KEDA creates its own HPA)" $name) }}
{{- end }}
{{- if gt (int $c.hpa.minReplicas) (int $c.hpa.maxReplicas) }}
{{- fail (printf "%s.hpa.minReplicas must not exceed %s.hpa.maxReplicas" $name $name) }}
{{- end }}
{{- if and $keda (gt (int $keda.minReplicaCount) (int $keda.maxReplicaCount)) }}
{{- fail (printf "%s.keda.minReplicaCount must not exceed %s.keda.maxReplicaCount" $name $name) }}
{{- end }}
{{- end }}
{{- $partitions := int .Values.config.partitions }}
{{- if gt (int .Values.reconciler.hpa.minReplicas) $partitions }}
{{- fail (printf "reconciler.hpa.minReplicas must not exceed config.partitions (%d)" $partitions) }}
{{- end }}
{{- if gt (int .Values.reconciler.keda.minReplicaCount) $partitions }}
{{- fail (printf "reconciler.keda.minReplicaCount must not exceed config.partitions (%d)" $partitions) }}
{{- end }}
{{- if gt (int .Values.reconciler.replicaCount) (int .Values.config.partitions) }}
{{- fail (printf "reconciler.replicaCount (%d) must not exceed config.partitions (%d): a replica without a partition owns nothing" (int .Values.reconciler.replicaCount) (int .Values.config.partitions)) }}
{{- end }}
{{- $maxDeliver := int (index (mustMergeOverwrite (dict "DEVSYNC_TOPOLOGY__MAX_DELIVER" 10) (default (dict) .Values.config.env) (default (dict) .Values.fanout.env)) "DEVSYNC_TOPOLOGY__MAX_DELIVER") }}
{{- if gt (int .Values.fanout.webhooks.attempts) $maxDeliver }}
{{- fail (printf "fanout.webhooks.attempts (%d) must not exceed the consumers' max deliveries (%d, DEVSYNC_TOPOLOGY__MAX_DELIVER): the last attempt is what dead-letters a task" (int .Values.fanout.webhooks.attempts) $maxDeliver) }}
{{- end }}
{{- if and (ne .Values.nats.auth.type "none") (not .Values.nats.auth.existingSecret) }}
{{- fail "nats.auth.existingSecret is required unless nats.auth.type is none" }}
{{- end }}
{{- end }}

{{/*
Egress rules of every devsync pod: DNS, NATS, PostgreSQL and, when otel.endpoint is set, the
OTLP collector. A target whose peer list is empty gets no rule (an empty `to` would mean
"anywhere").
*/}}
{{- define "devsync.egressRules" -}}
{{- $np := .Values.networkPolicy }}
{{- with $np.dns.to }}
- to:
    {{- toYaml . | nindent 4 }}
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
{{- end }}
{{- $targets := list $np.nats $np.postgres }}
{{- if .Values.otel.endpoint }}
{{- $targets = append $targets $np.otlp }}
{{- end }}
{{- range $targets }}
{{- if .to }}
- to:
    {{- toYaml .to | nindent 4 }}
  ports:
    {{- range .ports }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
{{- end }}
{{- end }}
{{- end }}
